"""Validations a resumed run would otherwise lose.

``ModelCheckpoint(every_n_train_steps)`` writes its checkpoint before the validation of the same step runs, and a run
resumed from it does not get that validation again from Lightning. If the interrupted run was killed during it, the
step's ``val/loss`` would be missing from the run's logs for good. Each validation leaves a small record,
``<log_dir>/val/step_<step>.json``; a run resumed at a validation step whose record is missing redoes the validation
loss at the start of training (:func:`redo_validation_loss`)."""

from __future__ import annotations

import math
import os

import lightning as L
import torch

from ..atomic import atomic_write_json

RECORD_DIR = "val"


def validation_due(trainer: L.Trainer) -> bool:
    """Whether Lightning's schedule validates right after the batch the trainer is at (a ``val_check_interval`` in
    batches, or an epoch's end; a time-based interval is not followed)."""
    batches = trainer.val_check_batch
    if not trainer.enable_validation or not isinstance(batches, int):
        return False
    loop = trainer.fit_loop.epoch_loop
    if trainer.check_val_every_n_epoch is None:
        return (loop.total_batch_idx + 1) % batches == 0
    return (trainer.current_epoch + 1) % trainer.check_val_every_n_epoch == 0 and (
        (loop.batch_idx + 1) % batches == 0 or loop.batch_progress.is_last_batch)


def record_path(trainer: L.Trainer, step: int) -> str | None:
    log_dir = trainer.log_dir
    return os.path.join(log_dir, RECORD_DIR, f"step_{step}.json") if log_dir else None


def write_record(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """The record of the validation just finished (rank 0)."""
    path = record_path(trainer, trainer.global_step)
    if path is None or not trainer.is_global_zero:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_json(path, {"step": trainer.global_step, **{k: float(v) for k, v in metrics.items()}})


def exists_on_rank_zero(trainer: L.Trainer, path: str) -> bool:
    """Whether rank 0 sees the file ``path`` (a run's records are written by rank 0); every rank gets its answer."""
    found = trainer.is_global_zero and os.path.exists(path)
    return trainer.strategy.broadcast(found, src=0) if trainer.world_size > 1 else found


def lost_on_resume(trainer: L.Trainer) -> bool:
    """Resumed at a validation step whose validation left no record (all ranks agree)."""
    step = trainer.global_step
    if trainer.ckpt_path is None or step == 0 or not validation_due(trainer):
        return False
    path = record_path(trainer, step)
    return path is not None and not exists_on_rank_zero(trainer, path)


def limited_batches(trainer: L.Trainer, available: int) -> int:
    """How many validation batches ``trainer.limit_val_batches`` allows out of ``available``."""
    limit = trainer.limit_val_batches
    if isinstance(limit, float):
        return available if limit == 1.0 else int(math.floor(available * limit))
    return min(int(limit), available)


@torch.no_grad()
def redo_validation_loss(trainer: L.Trainer, pl_module: L.LightningModule, batches) -> None:
    """Run ``pl_module.validation_step`` over the first ``limit_val_batches`` of ``batches`` in eval mode (with the
    precision plugin's context), as Lightning's validation would; the module's metrics accumulate them."""
    training = pl_module.training
    pl_module.eval()
    try:
        n = limited_batches(trainer, len(batches))
        with trainer.precision_plugin.val_step_context():
            for i, batch in enumerate(batches):
                if i >= n:
                    break
                pl_module.validation_step(trainer.strategy.batch_to_device(batch), i)
    finally:
        pl_module.train(training)
