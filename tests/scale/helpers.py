"""What the DDP and FSDP tests record from a real run (named in its config by class path), the run's config,
Lightning's FSDPStrategy made to run on CPU, and the `lightning-mamba fit` subprocesses."""

import math
import os
import subprocess
import sys
import tempfile

import lightning as L
import torch
import yaml
from lightning.pytorch.strategies import FSDPStrategy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")

# A launcher's or cluster's variables would make Lightning think the processes are started for it.
LAUNCH_VARS = {"LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED"}


def fit_at_once(*runs: list[str]) -> None:
    """`python -m lightning_mamba.cli fit ARGS` for each ARGS of ``runs``, as a user starts it (Lightning launches
    any further processes), all at once: the runs are independent, and most of each one's time is importing torch
    and Lightning, which overlaps on two cores."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "PMI_"))}
    with tempfile.TemporaryDirectory() as logs:
        procs = []
        for i, args in enumerate(runs):
            with open(os.path.join(logs, f"{i}.out"), "w") as out, open(os.path.join(logs, f"{i}.err"), "w") as err:
                procs.append(subprocess.Popen([sys.executable, "-m", "lightning_mamba.cli", "fit", *args], cwd=ROOT,
                                              env=env, stdout=out, stderr=err, text=True))
        try:
            for proc in procs:
                proc.wait(timeout=300)
        finally:
            for proc in procs:
                proc.kill()
        for i, proc in enumerate(procs):
            output = [_tail(os.path.join(logs, f"{i}.{stream}")) for stream in ("out", "err")]
            assert proc.returncode == 0, f"fit {' '.join(runs[i])}:\n" + "".join(output)


def _tail(path: str, chars: int = 3000) -> str:
    with open(path) as f:
        return f.read()[-chars:]


class RecordSteps(L.Callback):
    """Per rank and step, into ``out/rank<r>.pt``: the batch trained on (input_ids) and the flat gradient the
    optimizer is about to use (after DDP's all-reduce, before clipping); the initial and the final parameters."""

    def __init__(self, out: str):
        self.out = out
        self.batches, self.grads, self.initial = [], [], None

    def on_train_start(self, trainer, pl_module):
        self.initial = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch["input_ids"].clone())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(torch.cat([p.grad.detach().flatten() for _, p in pl_module.named_parameters()]))

    def on_train_end(self, trainer, pl_module):
        os.makedirs(self.out, exist_ok=True)
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        record = {"world_size": trainer.world_size, "rank": trainer.global_rank, "step": trainer.global_step,
                  "batches": self.batches, "grads": self.grads, "initial": self.initial, "params": params}
        torch.save(record, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


def write_config(path: str, corpus: str, cache_dir: str, record_dir: str, batch_size: int, max_steps: int,
                 callbacks: list[dict] | None = None, **trainer_settings) -> str:
    """A tiny one-process CPU run for `lightning-mamba fit` (add `--trainer configs/trainer/ddp_cpu.yaml` for DDP):
    byte tokenizer, fp32, a gradient clip that acts, no validation, no logger, no checkpoints. ``callbacks``
    replace the RecordSteps callback; ``trainer_settings`` are added to the trainer's."""
    record = {"class_path": "tests.scale.helpers.RecordSteps", "init_args": {"out": record_dir}}
    trainer = {
        "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "precision": "32-true",
        "gradient_clip_val": 0.1, "limit_val_batches": 0, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False,
        "log_every_n_steps": 1,  # RecordSharded reads every step's logged gradient norm
        "default_root_dir": os.path.dirname(os.path.abspath(path)),  # where the CLI writes config.yaml
        "callbacks": [record] if callbacks is None else callbacks,
        **trainer_settings,
    }
    config = {
        "seed_everything": 0,
        "trainer": trainer,
        "model": {"d_model": 32, "n_layer": 2, "d_state": 16, "headdim": 16, "chunk_size": 32, "backend": "torch",
                  "warmup_steps": 2},
        "data": {"source": corpus, "tokenizer": "byte", "seq_len": 64, "batch_size": batch_size,
                 "cache_dir": cache_dir},
    }
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


# ---- FSDP on CPU ------------------------------------------------------------------------------------------------
class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy on CPU, for the tests. Lightning refuses FSDP without a GPU (only for FSDPStrategy
    itself, not a subclass) and passes FSDP no device on CPU, which torch's FSDP then refuses: the model is
    wrapped here with device_id cpu, and Lightning's own setup takes it as already wrapped."""

    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            model = FullyShardedDataParallel(model, cpu_offload=self.cpu_offload,
                                             sharding_strategy=self.sharding_strategy,
                                             mixed_precision=self.mixed_precision_config,
                                             device_id=torch.device("cpu"), **self.kwargs)
            self.kwargs.pop("auto_wrap_policy", None)  # applied (Lightning would warn that it is ignored)
        return super()._setup_model(model)


def plain_name(name: str) -> str:
    for prefix in WRAPPERS:
        name = name.replace(prefix, "")
    return name


class RecordSharded(L.Callback):
    """Per rank, into ``out/rank<r>.pt``: what wraps the module, the optimizer's groups (weight decay and the
    parameters' names in the plain model), and per step the batch, this rank's own gradient norm (over the
    gradients it holds, before clipping), the grad norm the run logged, flops_per_batch; the NaN guard's skips."""

    def __init__(self, out: str):
        self.out = out
        self.batches, self.local_norms, self.logged_norms, self.flops = [], [], [], []

    def on_train_start(self, trainer, pl_module):
        names = {id(p): plain_name(n) for n, p in pl_module.named_parameters()}
        self.groups = [(g["weight_decay"], sorted(names[id(p)] for p in g["params"]))
                       for g in trainer.optimizers[0].param_groups]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch["input_ids"].clone())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.local_norms.append(torch.nn.utils.get_total_norm(grads).item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged_norms.append(trainer.callback_metrics["train/grad_norm"].item())
        self.flops.append(pl_module.flops_per_batch)

    def on_train_end(self, trainer, pl_module):
        from lightning_mamba.training.nan_guard import NanGuard

        os.makedirs(self.out, exist_ok=True)
        guard = next(c for c in trainer.callbacks if isinstance(c, NanGuard))
        record = {"world_size": trainer.world_size, "rank": trainer.global_rank, "step": trainer.global_step,
                  "wrapper": type(trainer.strategy.model).__name__, "groups": self.groups, "batches": self.batches,
                  "local_norms": self.local_norms, "logged_norms": self.logged_norms, "flops": self.flops,
                  "skipped": guard.skipped}
        torch.save(record, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


class NaNGradientOnLastRank(L.Callback):
    """At step ``step``, a NaN in one gradient entry the last rank holds (under FSDP: in its shard alone), after
    the gradients were reduced and before the NaN guard looks."""

    def __init__(self, step: int):
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step and trainer.global_rank == trainer.world_size - 1:
            grad = next(p.grad for p in pl_module.parameters() if p.grad is not None and p.grad.numel())
            grad.view(-1)[0] = math.nan
