"""The shipped multi-device trainer configs: DDP on CPU builds a 2-process gloo trainer; the GPU configs (ddp,
fsdp) compose with the default run and build their strategies (Lightning refuses FSDP without a GPU, so the
FSDP wrapping itself is checked with torch's FSDP on CPU: 2 gloo processes, one unit per Mamba-2 Block; a whole
Lightning FSDP run on CPU is in test_fsdp.py)."""

import gc
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy

from lightning_mamba.cli import MambaCLI, lightning_cli
from lightning_mamba.models.lm import Block

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "configs", "train.yaml")
TRAINER = os.path.join(ROOT, "configs", "trainer")


def parsed(monkeypatch, *args: str):
    """The CLI's configuration for ``args`` (parsed and checked, nothing instantiated: no GPU needed)."""
    with monkeypatch.context() as m:
        m.setattr(MambaCLI, "instantiate_classes", lambda self: None)
        return lightning_cli(["--config", TRAIN, *args], run=False).config


def build_strategy(strategy: dict) -> Strategy:
    """The strategy object a config's ``trainer.strategy`` (class_path + init_args) describes."""
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    return parser.instantiate(parser.parse_object({"strategy": strategy})).strategy


def fsdp_yaml_strategy() -> dict:
    with open(os.path.join(TRAINER, "fsdp.yaml")) as f:
        return yaml.safe_load(f)["strategy"]


def test_ddp_cpu_config_builds_a_two_process_gloo_trainer(tmp_path):
    cli = lightning_cli(["--config", TRAIN, "--trainer", os.path.join(TRAINER, "ddp_cpu.yaml"),
                         "--trainer.logger.init_args.save_dir", str(tmp_path)], run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, DDPStrategy) and strategy.process_group_backend == "gloo"
    assert cli.trainer.world_size == 2 and cli.trainer.num_devices == 2
    assert cli.trainer.precision == "32-true"


def test_ddp_gpu_config_composes_with_the_default_run(monkeypatch):
    config = parsed(monkeypatch, "--trainer", os.path.join(TRAINER, "ddp.yaml"))
    t = config.trainer
    assert (t.accelerator, t.devices, t.strategy, t.precision, t.num_nodes) == ("gpu", -1, "ddp", "bf16-mixed", 1)
    assert t.max_steps == 300 and len(t.callbacks) == 5  # the rest of the run is the default one


def test_fsdp_config_wraps_each_block_for_the_large_models(monkeypatch):
    config = parsed(monkeypatch, "--model", os.path.join(ROOT, "configs", "model", "mamba2_130m.yaml"),
                    "--trainer", os.path.join(TRAINER, "fsdp.yaml"))
    assert config.model.d_model == 768 and config.trainer.accelerator == "gpu"
    # the run's clip (FSDP's global norm) and the default run's callbacks, the forgetting observers among them
    assert config.trainer.precision == "bf16-mixed" and config.trainer.gradient_clip_val == 1.0
    assert [c.class_path.rsplit(".", 1)[1] for c in config.trainer.callbacks] == [
        "ModelCheckpoint", "LearningRateMonitor", "TokenThroughputMonitor", "LengthGeneralizationCallback",
        "StateStatsCallback"]
    assert config.trainer.strategy.class_path == "lightning.pytorch.strategies.FSDPStrategy"
    strategy = build_strategy(config.trainer.strategy.as_dict())
    assert isinstance(strategy, FSDPStrategy) and strategy._state_dict_type == "full"
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert strategy.kwargs["use_orig_params"]  # Lightning's default: tied embedding/head, our AdamW groups


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp_worker(rank: int, port: int, out: str) -> None:
    """One of 2 CPU processes: the config's FSDP wrapping of a tiny LM vs the same LM unwrapped."""
    import torch.nn.functional as F
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from lightning_mamba.training.module import MambaLitModule

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    policy = build_strategy(fsdp_yaml_strategy()).kwargs["auto_wrap_policy"]
    torch.manual_seed(0)
    kw = dict(d_model=32, n_layer=2, d_state=16, headdim=16, chunk_size=32, backend="torch", vocab_size=257)
    lit, ref = MambaLitModule(**kw), MambaLitModule(**kw)
    ref.load_state_dict(lit.state_dict())
    x = torch.randint(0, 257, (4, 65), generator=torch.Generator().manual_seed(1))
    ids, labels = x[:, :-1], x[:, 1:]
    ref_loss = ref.model_step({"input_ids": ids, "labels": labels})
    ref_loss.backward()
    wrapped = FSDP(lit, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
    logits, _ = wrapped(ids)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    loss.backward()
    inner = wrapped.module.model
    result = {
        "units": sum(isinstance(m, FSDP) for m in wrapped.modules()),
        "tied": inner.lm_head.weight is inner.backbone.embedding.weight,
        "loss": (loss.item(), ref_loss.item()),
        "grad_norm": (wrapped.clip_grad_norm_(1e9).item(), torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9).item()),
    }
    with FSDP.summon_full_params(wrapped):
        with torch.no_grad():
            result["full_params_equal"] = all(torch.allclose(p, q) for p, q in
                                              zip(inner.parameters(), ref.model.parameters()))
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    # FSDP holds the process group: left to the interpreter's teardown, gloo's threads can be destroyed after Python
    # is gone and abort the process (SIGABRT, "terminate called without an active exception", once in a full-suite
    # run with the barrier below already there). Drop it while Python is alive, and leave without the teardown.
    del wrapped, inner, lit  # lit: its blocks are wrapped in place
    gc.collect()
    dist.barrier()  # neither rank tears the group (and rank 0 its TCP store) down under the other
    dist.destroy_process_group()
    os._exit(0)  # the result is saved (closed file); the spawn sees exit code 0


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed (gloo)")
def test_fsdp_wrapping_of_the_config_keeps_the_tied_weights_and_the_math(tmp_path):
    mp.spawn(fsdp_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["units"] == 3  # the root + one per Block (n_layer 2)
        assert r["tied"] and r["full_params_equal"]
        assert r["loss"][0] == pytest.approx(r["loss"][1], rel=1e-6)
        assert r["grad_norm"][0] == pytest.approx(r["grad_norm"][1], rel=1e-5)  # FSDP's global norm
