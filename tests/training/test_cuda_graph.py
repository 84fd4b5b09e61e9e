"""model.cuda_graph: the training loss's forward and backward replayed from one CUDA graph train exactly like the
eager model; bad settings fail with one line. The graph tests need CUDA (run on the GPU machine)."""

import copy
import threading

import lightning as L
import pytest
import torch

from lightning_mamba.models import ConfigError, MambaConfig, MambaLM
from lightning_mamba.training.cuda_graph import GraphedLoss
from lightning_mamba.training.module import MambaLitModule


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, vocab=64, seq_len=32, n=64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq_len + 1), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i, :-1], "labels": self.ids[i, 1:]}


def tiny_module(**kwargs):
    return MambaLitModule(d_model=32, n_layer=2, d_state=16, headdim=16, vocab_size=64, chunk_size=16,
                          warmup_steps=1, **kwargs)


def test_needs_zero_initial_states():
    with pytest.raises(ConfigError, match="model.cuda_graph needs model.initial_state zero"):
        tiny_module(cuda_graph=True, initial_state="noise")


def test_fit_on_cpu_is_refused_before_training(tmp_path):
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)
    loader = torch.utils.data.DataLoader(RandomTokens(), batch_size=4)
    with pytest.raises(ConfigError, match="needs a CUDA device .*--trainer.accelerator gpu"):
        trainer.fit(tiny_module(cuda_graph=True), loader)


def test_gradient_accumulation_is_refused(tmp_path):
    trainer = L.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    loader = torch.utils.data.DataLoader(RandomTokens(), batch_size=4)
    with pytest.raises(ConfigError, match="needs --trainer.accumulate_grad_batches 1 \\(got 2\\)"):
        trainer.fit(tiny_module(cuda_graph=True), loader)


def test_cpu_inputs_run_eagerly():
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=64, ssm_cfg={"d_state": 16, "headdim": 16,
                                                                              "chunk_size": 16}))
    ids = torch.randint(0, 64, (2, 33))
    graphed = GraphedLoss(model)
    torch.testing.assert_close(graphed(ids[:, :-1], ids[:, 1:]), model.loss(ids[:, :-1], ids[:, 1:])[0])
    assert graphed.replays == 0


def _train(model, batches, loss_fn, autocast):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for ids in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
            loss = loss_fn(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("autocast", [False, True])
def test_graphed_training_equals_eager(backend, autocast):
    """Four optimizer steps on different batches: the graphed and the eager model see the same losses and end with
    the same weights (the replays read the updated parameters and the new inputs); a short batch runs eagerly."""
    torch.manual_seed(0)
    config = MambaConfig(d_model=64, n_layer=2, vocab_size=128, ssm_cfg={"d_state": 16, "headdim": 16, "chunk_size": 32})
    eager = MambaLM(config, backend=backend).cuda()
    graphed_model = copy.deepcopy(eager)
    batches = [torch.randint(0, 128, (4, 65), device="cuda") for _ in range(4)]
    graphed = GraphedLoss(graphed_model)
    want = _train(eager, batches, lambda x, y: eager.loss(x, y)[0], autocast)
    got = _train(graphed_model, batches, graphed, autocast)
    assert graphed.replays == 4
    tol = 1e-5 if not autocast else 2e-3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=tol, atol=tol)
    for (name, a), b in zip(graphed_model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=10 * tol, atol=10 * tol, msg=name)
    short = torch.randint(0, 128, (3, 65), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
        loss = graphed(short[:, :-1], short[:, 1:])
        ref = graphed_model.loss(short[:, :-1], short[:, 1:])[0]
    assert graphed.replays == 4
    torch.testing.assert_close(loss, ref)


@pytest.mark.gpu
def test_graphed_training_with_the_norm_output_remade_equals_eager():
    """recompute_norm_output under GraphedLoss: the backward graph makes each in_proj input again from the residual
    (captured with the rest); four steps give the eager model's losses and weights without the setting."""
    torch.manual_seed(0)
    config = MambaConfig(d_model=64, n_layer=2, vocab_size=128, ssm_cfg={"d_state": 16, "headdim": 16, "chunk_size": 32})
    eager = MambaLM(config).cuda()
    graphed_model = copy.deepcopy(eager)
    graphed_model.set_scan_settings(recompute_norm_output=True)
    batches = [torch.randint(0, 128, (4, 65), device="cuda") for _ in range(4)]
    graphed = GraphedLoss(graphed_model)
    want = _train(eager, batches, lambda x, y: eager.loss(x, y)[0], False)
    got = _train(graphed_model, batches, graphed, False)
    assert graphed.replays == 4
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(graphed_model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.gpu
def test_trainer_fit_with_cuda_graph_matches_eager(tmp_path):
    """A real Trainer (bf16-mixed, grad clipping, the WSD schedule): same losses as without the graphs."""
    losses = {}
    for flag in (False, True):
        torch.manual_seed(0)
        module = tiny_module(cuda_graph=flag)

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, *_):
                losses.setdefault(flag, []).append(outputs["loss"].item())

        trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=6, gradient_clip_val=1.0,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[Record()],
                            default_root_dir=tmp_path)
        trainer.fit(module, torch.utils.data.DataLoader(RandomTokens(), batch_size=8))
        if flag:
            assert module._graphed_loss.replays == 6
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
def test_capture_survives_another_threads_cuda_calls():
    """While the first batch is captured, another thread keeps making CUDA calls that stream capture forbids
    process-wide in torch's default "global" mode (event queries; fresh pinned allocations, as a DataLoader's
    pin-memory thread makes): GraphedLoss captures in "thread_local" mode, so the capture and the thread both
    survive and the graphed loss equals the eager one."""
    torch.manual_seed(0)
    config = MambaConfig(d_model=64, n_layer=2, vocab_size=128, ssm_cfg={"d_state": 16, "headdim": 16, "chunk_size": 32})
    model = MambaLM(config).cuda()
    ids = torch.randint(0, 128, (4, 65), device="cuda")
    event = torch.cuda.Event()
    event.record()
    torch.cuda.synchronize()
    stop, errors, calls = threading.Event(), [], [0]

    def busy():
        pinned = []
        try:
            while not stop.is_set():
                event.query()
                pinned.append(torch.empty(4096 + len(pinned)).pin_memory())  # a new size: a new pinned block
                pinned = pinned[-64:]
                calls[0] += 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    thread = threading.Thread(target=busy)
    thread.start()
    try:
        graphed = GraphedLoss(model)
        losses = []
        for _ in range(3):
            loss = graphed(ids[:, :-1], ids[:, 1:])
            loss.backward()
            losses.append(loss.detach().clone())
            model.zero_grad(set_to_none=True)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert calls[0] > 0 and graphed.replays == 3
    torch.testing.assert_close(losses[-1], model.loss(ids[:, :-1], ids[:, 1:])[0])


def _tiny_cuda_model():
    torch.manual_seed(0)
    config = MambaConfig(d_model=64, n_layer=2, vocab_size=128, ssm_cfg={"d_state": 16, "headdim": 16, "chunk_size": 32})
    return MambaLM(config).cuda()


@pytest.mark.gpu
def test_backward_hands_gradients_as_autograd_would():
    """The replayed loss's backward: the gradients of (c x loss) are c times the loss's, laid out as their parameters;
    a parameter that already holds a gradient gets the replay's added (autograd's accumulation), one without gets the
    graph's buffer."""
    model = _tiny_cuda_model()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 128, (4, 65), device="cuda")
    graphed = GraphedLoss(model)
    graphed(ids[:, :-1], ids[:, 1:]).backward()  # the capture
    model.zero_grad(set_to_none=True)
    (3.0 * graphed(ids[:, :-1], ids[:, 1:])).backward()
    (3.0 * ref.loss(ids[:, :-1], ids[:, 1:])[0]).backward()
    assert graphed.replays == 2
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
        assert p.grad.stride() == p.stride(), name  # fused optimizers refuse other layouts
    ones = {name: torch.ones_like(p) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = ones[name].clone()
    graphed(ids[:, :-1], ids[:, 1:]).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, ones[name] + q.grad / 3.0, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.gpu
def test_fp16_autocast_runs_eagerly_and_the_trainer_refuses_it(tmp_path):
    """Under fp16 autocast the loss scale would enter the backward the graph captured without it: such calls run
    eagerly, and a Trainer with 16-mixed and model.cuda_graph stops before training with one line."""
    model = _tiny_cuda_model()
    ids = torch.randint(0, 128, (4, 65), device="cuda")
    graphed = GraphedLoss(model)
    with torch.autocast("cuda", dtype=torch.float16, cache_enabled=False):
        loss = graphed(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert graphed.replays == 0 and graphed.signature is None
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="16-mixed", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match="model.cuda_graph trains under bf16-mixed or 32-true .*16-mixed"):
        trainer.fit(tiny_module(cuda_graph=True), torch.utils.data.DataLoader(RandomTokens(), batch_size=4))


def _fit(tmp_path, callbacks=(), max_steps=8, **module_kwargs):
    """A real Trainer fit of the tiny module (bf16-mixed, norm clipping that bites, the NaN guard); returns the
    module, the trainer and the losses of every step."""
    from lightning_mamba.training.nan_guard import NanGuard

    torch.manual_seed(0)
    module = tiny_module(**module_kwargs)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, *_):
            losses.append(outputs["loss"].item())

    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=max_steps, gradient_clip_val=0.05,
                        log_every_n_steps=1, logger=False, enable_progress_bar=False,
                        callbacks=[Record(), NanGuard(), *callbacks],
                        default_root_dir=tmp_path, enable_checkpointing=any(
                            isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks))
    trainer.fit(module, torch.utils.data.DataLoader(RandomTokens(n=128), batch_size=8))
    return module, trainer, losses


@pytest.mark.gpu
def test_graphed_update_trains_like_the_eager_update(tmp_path):
    """model.cuda_graph_update: the NaN guard's check, clipping (0.05: it scales every step) and fused AdamW replayed
    from a graph after one eager step give the eager update's losses, weights and lr schedule (the groups keep float
    lrs, which each replay copies into the graph's), and train/grad_norm."""
    eager, eager_trainer, want = _fit(tmp_path / "eager", cuda_graph=True)
    graphed, trainer, got = _fit(tmp_path / "graphed", cuda_graph=True, cuda_graph_update=True)
    assert graphed._graphed_update.replays == 7 and graphed._graphed_loss.replays == 8
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-3, atol=2e-3)
    for (name, a), b in zip(graphed.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3, msg=name)
    groups = trainer.optimizers[0].param_groups
    assert [g["lr"] for g in groups] == [g["lr"] for g in eager_trainer.optimizers[0].param_groups]
    assert all(isinstance(g["lr"], float) and g["capturable"] is False for g in groups)
    assert [float(t) for t in graphed._graphed_update._lrs] == pytest.approx([g["lr"] for g in groups], rel=1e-6)
    norm = float(trainer.callback_metrics["train/grad_norm"])
    assert norm == pytest.approx(float(eager_trainer.callback_metrics["train/grad_norm"]), rel=2e-2) and norm > 0.05


@pytest.mark.gpu
def test_graphed_update_checkpoints_hold_the_usual_optimizer_state(tmp_path):
    """A checkpoint written during a graphed-update run holds the optimizer as any other run's: each group's lr a
    float and capturable off, so a run resumed from it, graphed or not, starts as usual."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _, trainer, _ = _fit(tmp_path, callbacks=[ckpt], max_steps=4, cuda_graph=True, cuda_graph_update=True)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    for group in state["optimizer_states"][0]["param_groups"]:
        assert isinstance(group["lr"], float) and group["capturable"] is False
    assert trainer.lightning_module._graphed_update.replays == 3


def test_graphed_update_needs_the_loss_graph_and_norm_clipping(tmp_path):
    with pytest.raises(ConfigError, match="model.cuda_graph_update replays the update after the loss's graph"):
        tiny_module(cuda_graph_update=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, gradient_clip_val=1.0, gradient_clip_algorithm="value",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match="clips by norm in its graph \\(got --trainer.gradient_clip_algorithm value\\)"):
        trainer.fit(tiny_module(cuda_graph=True, cuda_graph_update=True),
                    torch.utils.data.DataLoader(RandomTokens(), batch_size=4))


@pytest.mark.gpu
def test_graphed_update_stops_at_a_non_finite_step(tmp_path):
    """A step whose loss is not finite under model.cuda_graph_update: the graph's check skips it on the device and the
    NaN guard (reading that verdict a step later) stops the run naming the step."""
    from lightning_mamba.training.nan_guard import NonFiniteError

    class Poison(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                with torch.no_grad():
                    pl_module.model.backbone.embedding.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteError, match="global step 3 .*parameter model.backbone.embedding.weight"):
        _fit(tmp_path, callbacks=[Poison()], cuda_graph=True, cuda_graph_update=True)
