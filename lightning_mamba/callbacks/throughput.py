"""Tokens per second and MFU through Lightning's own ThroughputMonitor.

Tags (the README's "tokens/s, MFU"): ``train/tokens_per_sec`` (all processes together) and ``train/mfu`` (model
FLOPs over the device's dense peak, per device), beside Lightning's per-process ``train/device/*`` numbers (its
``items`` are tokens here). MFU is logged only where the device's peak is known: :data:`PEAK_FLOPS` (dense, not
the 2:4-sparsity figures of the datasheets, which Lightning's own table holds for Hopper), else Lightning's table;
never on a CPU."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_only

# Dense peak FLOP/s by (device-name substring, compute dtype); the first matching name wins, so the more specific
# names come first. "tf32": float32 matmuls on tensor cores (torch.get_float32_matmul_precision() != "highest").
PEAK_FLOPS: tuple[tuple[str, dict], ...] = (
    ("H200 NVL", {torch.bfloat16: 835e12, torch.float16: 835e12, "tf32": 418e12, torch.float32: 60e12}),
    ("H100 NVL", {torch.bfloat16: 835e12, torch.float16: 835e12, "tf32": 418e12, torch.float32: 60e12}),
    ("H100 PCIe", {torch.bfloat16: 756e12, torch.float16: 756e12, "tf32": 378e12, torch.float32: 51e12}),
    ("H200", {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, "tf32": 494.7e12, torch.float32: 66.9e12}),
    ("H100", {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, "tf32": 494.7e12, torch.float32: 66.9e12}),
    ("A100", {torch.bfloat16: 312e12, torch.float16: 312e12, "tf32": 156e12, torch.float32: 19.5e12}),
)


def peak_flops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """The dense peak FLOP/s of ``device`` at ``dtype`` (None where unknown: a CPU, an unlisted GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = "tf32" if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest" else dtype
    for pattern, table in PEAK_FLOPS:
        if pattern.lower() in name.lower():
            return table.get(key)
    return get_available_flops(device, dtype)  # Lightning's table (dense for the pre-Hopper chips it lists)


def _batch_size(batch: dict) -> int:
    return batch["input_ids"].size(0)


def _tokens(batch: dict) -> int:
    return batch["input_ids"].numel()


class TokenThroughputMonitor(ThroughputMonitor):
    """ThroughputMonitor for token batches: ``train/tokens_per_sec`` is tokens/s over all processes (per process:
    ``train/device/items_per_sec``), ``train/mfu`` the MFU where the device's dense peak is known (FLOPs come from
    the LightningModule's ``flops_per_batch``, a training step's; validation logs tokens/s but no FLOPs or MFU).

    Training batches are timed only at the steps whose metrics are logged (``trainer.log_every_n_steps``) and
    before each validation, not after every batch as the base class does: its per-batch GPU synchronisation keeps
    the CPU from queueing the next step while the GPU still runs this one. The rates are therefore over the last
    ``window_size - 1`` logged intervals (default 2: 20 steps at ``log_every_n_steps`` 10); validation batches are
    timed as in the base class. The totals (``train/batches``, ``train/samples``, ``train/lengths``, ``train/time``)
    are kept in checkpoints, so that a resumed run continues counting from where its checkpoint was.
    """

    def __init__(self, window_size: int = 3, **kwargs: Any):
        super().__init__(batch_size_fn=_batch_size, length_fn=_tokens, window_size=window_size, **kwargs)
        self._untimed = 0  # training batches counted since the last timed one
        self._resumed: dict = {}  # a checkpoint's totals, until training starts

    def state_dict(self) -> dict:
        stage = RunningStage.TRAINING
        if stage not in self._t0s:  # not rank 0, or not training yet
            return dict(self._resumed)
        return {"batches": self._batches[stage], "samples": self._samples[stage], "lengths": self._lengths[stage],
                "time": time.perf_counter() - self._t0s[stage]}  # validation is kept off this clock already

    def load_state_dict(self, state_dict: dict) -> None:
        self._resumed = dict(state_dict)

    def training_seconds(self) -> float | None:
        """Seconds of training so far over every run of this fit, resumed ones included (validation left out): the
        clock the checkpoints carry. None before training started here or in a checkpoint."""
        seconds = self.state_dict().get("time")
        return None if seconds is None else float(seconds)

    def _start(self, trainer: L.Trainer) -> None:
        super()._start(trainer)
        stage = trainer.state.stage
        if stage == RunningStage.TRAINING and self._resumed:  # continue the checkpoint's totals, not from 0
            saved, self._resumed = self._resumed, {}
            for totals, key in ((self._batches, "batches"), (self._samples, "samples"), (self._lengths, "lengths")):
                totals[stage] = int(saved.get(key, 0))
            self._t0s[stage] -= float(saved.get("time", 0.0))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # as the base class, with the dense peak of PEAK_FLOPS (Lightning's table has Hopper's sparse figures and
        # does not know a plain "NVIDIA H200")
        self.available_flops = peak_flops(trainer.strategy.root_device, _plugin_to_compute_dtype(trainer.precision_plugin))
        if stage == TrainerFn.FITTING and trainer.enable_validation:
            self._throughputs[RunningStage.VALIDATING] = Throughput(
                available_flops=self.available_flops, world_size=trainer.world_size, **self.kwargs)
        self._throughputs[trainer.state.stage] = Throughput(
            available_flops=self.available_flops, world_size=trainer.world_size, **self.kwargs)

    def _compute(self, trainer: L.Trainer, iter_num: int | None = None) -> None:
        if not trainer._logger_connector.should_update_logs:
            return
        stage = trainer.state.stage
        throughput = self._throughputs[stage]
        sep = throughput.separator
        metrics = throughput.compute()
        if stage != RunningStage.TRAINING:  # flops_per_batch is a training step's (forward + backward)
            metrics = {k: v for k, v in metrics.items() if "flops" not in k and "mfu" not in k}
        if f"device{sep}items_per_sec" in metrics:
            metrics["tokens_per_sec"] = metrics[f"device{sep}items_per_sec"] * trainer.world_size
        if f"device{sep}mfu" in metrics:
            metrics["mfu"] = metrics[f"device{sep}mfu"]
        metrics = {f"{stage.value}{sep}{k}": v for k, v in metrics.items()}
        trainer._logger_connector.log_metrics(metrics, step=iter_num)

    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, iter_num: int) -> None:
        stage = trainer.state.stage
        if stage != RunningStage.TRAINING:
            return super()._update(trainer, pl_module, batch, iter_num)
        self._lengths[stage] += _tokens(batch)
        self._samples[stage] += _batch_size(batch)
        self._batches[stage] += 1
        self._untimed += 1
        if trainer._logger_connector.should_update_logs:  # the base class's _compute logs at these steps
            self._time_training(trainer, pl_module)

    def _time_training(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stage = RunningStage.TRAINING
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # the clock must include the queued work
        flops = getattr(pl_module, "flops_per_batch", None)
        self._throughputs[stage].update(
            time=time.perf_counter() - self._t0s[stage], batches=self._batches[stage], samples=self._samples[stage],
            lengths=self._lengths[stage], flops=None if flops is None else flops * self._untimed,
        )
        self._untimed = 0

    @rank_zero_only
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # time the training batches since the last logged step now, so that the base class's bookkeeping (which
        # takes the last training time as the start of validation) leaves the validation out of training's clock
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING and self._untimed:
            self._time_training(trainer, pl_module)
        super().on_validation_start(trainer, pl_module)
