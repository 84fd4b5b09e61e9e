"""Tokens per second and MFU through Lightning's own ThroughputMonitor."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_only


def _batch_size(batch: dict) -> int:
    return batch["input_ids"].size(0)


def _tokens(batch: dict) -> int:
    return batch["input_ids"].numel()


class TokenThroughputMonitor(ThroughputMonitor):
    """ThroughputMonitor for token batches: ``train/items_per_sec`` is tokens/s, ``train/device/mfu`` the MFU
    (FLOPs come from the LightningModule's ``flops_per_batch``).

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

    def _start(self, trainer: L.Trainer) -> None:
        super()._start(trainer)
        stage = trainer.state.stage
        if stage == RunningStage.TRAINING and self._resumed:  # continue the checkpoint's totals, not from 0
            saved, self._resumed = self._resumed, {}
            for totals, key in ((self._batches, "batches"), (self._samples, "samples"), (self._lengths, "lengths")):
                totals[stage] = int(saved.get(key, 0))
            self._t0s[stage] -= float(saved.get("time", 0.0))

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
