"""Training interventions (Buitrago Ruiz & Gu, 2025): state passing and noise initial states, unit by unit and
through real CPU runs of `lightning-mamba fit` (the state each step starts from, epoch resets, exact resume)."""

import glob
import os
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_mamba.cli import lightning_cli, main
from lightning_mamba.models import ConfigError, MambaConfig, MambaLM
from lightning_mamba.training.initial_states import InitialStates
from lightning_mamba.training.module import MambaLitModule

from ..robust.conftest import logged_losses, run_config, write_corpus
from ..robust.helpers import SimulatedCrash

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, BATCH = 8, 32  # ~10K training tokens, 32 lanes of 5 chunks of 64 tokens: 8 steps cross an epoch end
PASSED = ["--data.state_passing", "true", "--model.initial_state", "passed"]
NOISE = ["--model.initial_state", "noise", "--model.noise_calibrate_every", "2"]


def tiny_model() -> MambaLM:
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=64,
                         ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 16})
    return MambaLM(config, backend="torch")


def callback(name: str, **init_args) -> dict:
    return {"class_path": f"tests.training.test_initial_states.{name}", "init_args": init_args}


class RecordSteps(L.Callback):
    """Per step: the batch, the weights it was trained with, the loss, and the state carried after it."""

    def __init__(self):
        self.batches, self.weights, self.losses, self.carried = [], [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({k: v.clone() for k, v in batch.items()})
        self.weights.append({k: v.clone() for k, v in pl_module.model.state_dict().items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach())
        carried = pl_module.initial_states.carried
        self.carried.append(None if carried is None else [[t.clone() for t in s] for s in carried])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_corpus(tmp_path_factory.mktemp("texts"), words_per_doc=200)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


# ---- units -----------------------------------------------------------------------------------------------
def test_passed_state_restarts_the_rows_marked_for_reset():
    model, states = tiny_model(), InitialStates("passed")
    ids = torch.randint(0, 64, (3, 20))
    _, final = model(ids)
    states.finish(final)
    assert all(not s.ssm.requires_grad for s in states.carried)  # detached: truncated BPTT
    start = states.passed({"input_ids": ids, "state_reset": torch.tensor([False, True, False])})
    for got, want in zip(start, final):
        assert torch.equal(got.ssm[[0, 2]], want.ssm[[0, 2]]) and torch.equal(got.conv[[0, 2]], want.conv[[0, 2]])
        assert not got.ssm[1].any() and not got.conv[1].any()
    assert all(not s.ssm.any() for s in states.passed({"input_ids": ids, "state_reset": torch.ones(3, dtype=bool)}))
    with pytest.raises(ConfigError, match="set data.state_passing true"):
        states.passed({"input_ids": ids})
    poisoned = [s._replace(ssm=s.ssm.clone()) for s in final]
    poisoned[1].ssm[2, 0, 0, 0] = float("nan")
    states.finish(poisoned)
    for got, want in zip(states.carried, final):  # the non-finite row restarts instead of passing NaNs on
        assert torch.equal(got.ssm[:2], want.ssm[:2]) and not got.ssm[2].any() and not got.conv[2].any()
    states.carried = None  # e.g. a checkpoint without a carried state
    with pytest.warns(UserWarning, match="no carried state for a batch that continues its lanes"):
        assert states.passed({"input_ids": ids, "state_reset": torch.zeros(3, dtype=torch.bool)}) is None


def test_noise_has_the_calibrated_scale_per_layer_and_head():
    torch.manual_seed(0)
    model, states = tiny_model(), InitialStates("noise", noise_scale=2.0)
    batch = {"input_ids": torch.randint(0, 64, (4, 48))}
    rms = states.calibrate(model, batch)
    _, final = model(batch["input_ids"])
    for layer, s in enumerate(final):  # the RMS of the model's own final SSM states, per head
        torch.testing.assert_close(rms[layer], s.ssm.pow(2).mean(dim=(0, 2, 3)).sqrt())
    noise = states.noise(model, 512, "cpu", step=3)
    for layer, s in enumerate(noise):
        assert not s.conv.any()  # the convolution state stays zero
        std = s.ssm.std(dim=(0, 2, 3))  # 512 x 16 x 8 draws per head
        torch.testing.assert_close(std, 2.0 * rms[layer], rtol=0.03, atol=0)
    assert torch.equal(states.noise(model, 512, "cpu", step=3)[0].ssm, noise[0].ssm)  # seeded by the step
    assert not torch.equal(states.noise(model, 512, "cpu", step=4)[0].ssm, noise[0].ssm)
    assert not torch.equal(states.noise(model, 512, "cpu", step=3, rank=1)[0].ssm, noise[0].ssm)


def test_noise_is_recalibrated_every_n_steps():
    model, states = tiny_model(), InitialStates("noise", calibrate_every=3)
    calls = []
    original = states.calibrate
    states.calibrate = lambda *a: calls.append(1) or original(*a)
    batch = {"input_ids": torch.randint(0, 64, (2, 16))}
    for step in range(7):
        states.start(model, batch, step=step)
        if step == 0:
            assert len(calls) == 1
    assert len(calls) == 3  # steps 0, 3, 6


def test_checkpoint_state_is_plain_tensors(tmp_path):
    model, states = tiny_model(), InitialStates("passed")
    states.noise_rms = torch.ones(2, 4)
    _, final = model(torch.randint(0, 64, (3, 10)))
    states.finish(final)
    torch.save(states.state_dict(), tmp_path / "s.pt")
    saved = torch.load(tmp_path / "s.pt", weights_only=True)  # what --ckpt_path's check reads
    again = InitialStates("passed")
    again.load_state_dict(saved)
    assert all(torch.equal(a.ssm, b.ssm) and torch.equal(a.conv, b.conv) for a, b in zip(again.carried, final))
    with pytest.warns(UserWarning, match="carried states are of 1 processes, this run has 2"):
        again.load_state_dict(saved, rank=0, world_size=2)
    assert again.carried is None


def test_a_large_carried_state_is_named_once_when_saved(monkeypatch):
    import lightning_mamba.training.initial_states as initial_states

    model, states = tiny_model(), InitialStates("passed")
    _, final = model(torch.randint(0, 64, (3, 10)))
    states.finish(final)
    states.state_dict()  # far below the limit: nothing to say
    monkeypatch.setattr(initial_states, "LARGE_CARRIED_BYTES", 1000)
    with pytest.warns(UserWarning, match=r"each checkpoint holds the carried state of every lane, 0.0 GB"):
        states.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        states.state_dict()  # said once


@pytest.mark.parametrize("kw, message", [({"initial_state": "carried"}, "model.initial_state='carried' is unknown"),
                                         ({"noise_scale": -1.0}, "model.noise_scale must be >= 0"),
                                         ({"noise_calibrate_every": 0}, "model.noise_calibrate_every must be >= 1")])
def test_bad_settings_say_what_to_change(kw, message):
    with pytest.raises(ConfigError, match=message):
        MambaLitModule(d_model=32, n_layer=1, d_state=8, headdim=16, vocab_size=64, backend="torch", **kw)


# ---- real runs --------------------------------------------------------------------------------------------
def fit(folder, corpus, cache_dir, extra, steps=STEPS, callbacks=()):
    main(["fit", "--config", run_config(folder, corpus, cache_dir, steps, batch_size=BATCH, callbacks=list(callbacks)),
          *extra])


def recorded(folder, corpus, cache_dir, extra) -> RecordSteps:
    cfg = run_config(folder, corpus, cache_dir, 7, batch_size=BATCH, callbacks=[callback("RecordSteps")])
    cli = lightning_cli(["fit", "--config", cfg, *extra])
    if "--data.state_passing" in extra:
        assert cli.trainer.train_dataloader.dataset.chunks == 5  # what the tests below count on
    return next(c for c in cli.trainer.callbacks if isinstance(c, RecordSteps))


def test_each_step_starts_from_the_previous_final_state_and_epochs_restart(tmp_path, corpus, cache_dir):
    """Recomputed independently: step k's loss is the loss from step k - 1's final state (zero at the epoch
    start), with the weights of step k; the state kept after step k is step k's final state."""
    record = recorded(tmp_path, corpus, cache_dir, PASSED)
    model = tiny_run_model(record)
    state = None
    for k, (batch, weights, loss) in enumerate(zip(record.batches, record.weights, record.losses)):
        model.load_state_dict(weights)
        assert batch["state_reset"].tolist() == [k in (0, 5)] * BATCH  # 5 chunks per lane: an epoch is 5 steps
        if k in (0, 5):
            state = None  # each epoch starts from zero states
        with torch.no_grad():
            logits, final = model(batch["input_ids"], state=state)
            expected = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
            zero_start = F.cross_entropy(model(batch["input_ids"])[0].flatten(0, 1), batch["labels"].flatten())
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
        assert (state is None) == bool(torch.equal(expected, zero_start))  # the carried state did change the loss
        for kept, s in zip(record.carried[k], final):
            torch.testing.assert_close(kept[0], s.conv, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(kept[1], s.ssm, rtol=1e-6, atol=1e-7)
        state = final


def tiny_run_model(record: RecordSteps) -> MambaLM:
    """A MambaLM with the shape of the runs' model (run_config's tiny model, byte vocabulary)."""
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=257, ssm_cfg={
        "layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 32})
    model = MambaLM(config, backend="torch")
    model.load_state_dict(record.weights[0])
    return model


def test_passed_without_lanes_is_a_one_line_error(tmp_path, corpus, cache_dir):
    with pytest.raises(SystemExit, match="error: model.initial_state=passed .* set data.state_passing true"):
        fit(tmp_path, corpus, cache_dir, ["--model.initial_state", "passed"], steps=1)


@pytest.fixture(scope="module")
def references(tmp_path_factory, corpus, cache_dir) -> dict[str, dict[int, float]]:
    """The uninterrupted runs' losses per step, with passed and with noise initial states."""
    out = {}
    for name, extra in (("passed", PASSED), ("noise", NOISE)):
        folder = tmp_path_factory.mktemp(name)
        fit(folder, corpus, cache_dir, extra)
        out[name] = logged_losses(folder)
        assert sorted(out[name]) == list(range(STEPS))
    return out


@pytest.mark.parametrize("mode, crash_at", [("passed", 3), ("passed", 7), ("noise", 3)])
def test_resume_continues_with_the_carried_state(tmp_path, corpus, cache_dir, references, mode, crash_at):
    """Interrupted mid-epoch (epoch 0, and epoch 1 after a reset) and resumed from last.ckpt: identical losses."""
    extra = PASSED if mode == "passed" else NOISE
    with pytest.raises(SimulatedCrash):
        fit(tmp_path, corpus, cache_dir, extra, callbacks=[{"class_path": "tests.robust.helpers.CrashAt",
                                                           "init_args": {"step": crash_at}}])
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == crash_at
    assert ("carried" in saved["initial_states"]) == (mode == "passed")
    fit(tmp_path, corpus, cache_dir, [*extra, "--ckpt_path", str(last)])
    resumed = logged_losses(tmp_path, version=newest_version(tmp_path))
    assert sorted(resumed) == list(range(crash_at, STEPS))
    assert resumed == {s: references[mode][s] for s in resumed}  # exact, no tolerance


def newest_version(folder) -> str:
    return max(glob.glob(os.path.join(folder, "runs", "tiny", "version_*")), key=lambda p: int(p.split("_")[-1]))


def test_fine_tune_from_a_training_checkpoint(tmp_path, corpus, cache_dir):
    """`--model.pretrained X.ckpt` starts from the checkpoint's weights (not its optimizer or position), and
    refuses data with another tokenizer."""
    fit(tmp_path / "base", corpus, cache_dir, [], steps=2)
    ckpt = tmp_path / "base" / "ckpt" / "last.ckpt"
    record = recorded(tmp_path / "tuned", corpus, cache_dir, [*PASSED, "--model.pretrained", str(ckpt),
                                                              "--trainer.max_steps", "1"])
    weights = torch.load(ckpt, weights_only=True)["state_dict"]
    assert all(torch.equal(v, weights[f"model.{k}"]) for k, v in record.weights[0].items())
    assert record.batches[0]["state_reset"].all()  # a fresh run: its own first epoch, from zero states
    # (refused from the settings, before a BPE is trained: checkpoint_io.check_tokenizer_kind)
    with pytest.raises(SystemExit, match="trained with the byte tokenizer, but data.tokenizer is bpe: set --data.tokenizer byte$"):
        fit(tmp_path / "other", corpus, cache_dir, ["--model.pretrained", str(ckpt), "--data.tokenizer", "bpe",
                                                    "--data.bpe_vocab_size", "300"], steps=1)


def test_the_experiment_config_validates(tmp_path):
    cli = lightning_cli(["--config", os.path.join(ROOT, "configs", "train.yaml"),
                         "--config", os.path.join(ROOT, "configs", "experiment", "state_passing.yaml"),
                         "--trainer.logger.init_args.save_dir", str(tmp_path)], run=False)
    assert cli.model.initial_states.mode == "passed" and cli.datamodule.hparams.state_passing
