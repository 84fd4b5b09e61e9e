"""A run that stops before its max_steps keeps its place: last.ckpt at the step where it stopped, and a time budget
that a resumed run gets again (a study's time_per_cell)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, Timer


class CheckpointAtStop(L.Callback):
    """A fit that ends before max_steps (Trainer(max_time) ran out, a callback set should_stop) saves last.ckpt at the
    step it stopped at. ModelCheckpoint writes last.ckpt at the end of training only when it has written none in this
    run (its on_train_end), so a run that saved at its every_n_train_steps interval kept that older file, and a
    resumed run redid up to an interval of steps (999 in the regime study). Saved after the loops are done, as
    ModelCheckpoint's own end-of-training save: a resume from it repeats the uninterrupted run's steps exactly."""

    def __init__(self):
        self.saved_at: int | None = None  # the global step of this run's newest checkpoint

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.saved_at = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.should_stop or trainer.global_step == 0 or self.saved_at == trainer.global_step:
            return  # finished as planned (ModelCheckpoint's schedule applies), or nothing new to save
        cb = next((cb for cb in trainer.checkpoint_callbacks
                   if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath), None)
        if cb is not None:  # every rank decides alike (saving is collective)
            trainer.save_checkpoint(cb.format_checkpoint_name({}, cb.CHECKPOINT_NAME_LAST))


class BudgetPerRun(Timer):
    """Lightning's Timer (Trainer(max_time)) counting this run only. Lightning's restores the time a checkpoint has
    already trained, so a resumed run with the same max_time stops at once: a sweep's "run the same command again to
    resume" trained nothing. Here each run of the command gives each unfinished cell its whole budget again."""

    def load_state_dict(self, state_dict: dict) -> None:
        pass  # the elapsed time of earlier runs is not this run's
