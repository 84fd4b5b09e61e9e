"""A run that stops before its max_steps keeps its place: last.ckpt at the step where it stopped (SIGTERM, a time
limit, a callback's stop), the line that says how to resume, and a time budget that a resumed run gets again (a
study's time_per_cell)."""

from __future__ import annotations

import shlex
import signal
import sys
import threading

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, Timer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .nan_guard import run_config_path

# save_checkpoint's weights_only: the stop's checkpoint is written whole (optimizer, loops, callbacks) to resume from.
# This is a save: nothing is loaded. Left None, Lightning logs a line that it defaults to this.
WHOLE = False


def last_checkpoint_path(trainer: L.Trainer, save_last_only: bool = False) -> str | None:
    """Where the run's ModelCheckpoint writes last.ckpt (the first one with a folder; with ``save_last_only``, one
    that keeps a last.ckpt at all), or None."""
    cb = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath
               and (cb.save_last or not save_last_only)), None)
    return None if cb is None else cb.format_checkpoint_name({}, cb.CHECKPOINT_NAME_LAST)


class CheckpointOnSigterm(L.Callback):
    """SIGTERM (what SLURM sends before it kills a job): Lightning stops after the batch with ``SIGTERMException``, a
    ``SystemExit`` of code None, i.e. exit status 0. Save last.ckpt at that batch's end (where ModelCheckpoint saves:
    it resumes exactly) and give the exception the line that says how to resume (``lightning_mamba.cli`` prints it
    and exits 143, 128 + SIGTERM).

    A SIGTERM during a fit's validation: Lightning would stop after that validation batch, with nothing saved since
    the step before (a study cell validates every few hundred steps, and its evaluation takes seconds: a signal often
    lands there). The validation is finished instead (the signal held back until its end), then last.ckpt is saved
    with the validation done, as ModelCheckpoint's own end-of-validation saves are, and the run stops.

    Ctrl-C (SIGINT) during a fit takes the same path (exit 130): Lightning would stop at once with nothing saved, up to
    a checkpoint interval lost. A second Ctrl-C stops at once, as before."""

    def __init__(self):
        self.saved: str | None = None
        self._config = "CONFIG"
        self.resume: str | None = None  # how to resume, when not `lightning-mamba fit --ckpt_path` (a sweep's cell)
        self._held = False  # a SIGTERM held back until the end of this validation
        self.interrupted = False  # the stop came from Ctrl-C (SIGINT), not SIGTERM
        self._sigint_before = None  # Python's SIGINT handler while this fit's is installed

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._config = run_config_path(trainer)

    # ---- Ctrl-C: the first stops as SIGTERM does (at the step's end, last.ckpt saved), a second at once ----------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # only over Python's own handler (not one a user set, not SIGINT ignored), from the main thread (signal's rule)
        connector = getattr(trainer, "_signal_connector", None)
        if (threading.current_thread() is threading.main_thread() and hasattr(connector, "received_sigterm")
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._sigint_before = signal.default_int_handler

            def first_ctrl_c(signum, frame):
                self._restore_sigint()  # a second Ctrl-C raises KeyboardInterrupt at once
                self.interrupted = True
                connector.received_sigterm = True  # Lightning's SIGTERM path: stop after this step
                print("Ctrl-C: stopping after this step with last.ckpt saved (Ctrl-C again to stop at once, "
                      "without it)", file=sys.stderr, flush=True)

            signal.signal(signal.SIGINT, first_ctrl_c)

    def _restore_sigint(self) -> None:
        if self._sigint_before is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._sigint_before)
            self._sigint_before = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_sigint()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # every process decides alike: saving a checkpoint is collective
        if self.saved is None and trainer.strategy.reduce_boolean_decision(trainer.received_sigterm, all=False):
            self.saved = last_checkpoint_path(trainer)
            if self.saved is not None:
                trainer.save_checkpoint(self.saved, weights_only=WHOLE)

    @staticmethod
    def _fit_validation(trainer: L.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args, **kwargs) -> None:
        # Lightning's evaluation loop raises after this hook when the flag is set (Trainer.received_sigterm reads its
        # signal connector's attribute, private: where it is missing, Lightning's own stop happens)
        connector = getattr(trainer, "_signal_connector", None)
        if self._fit_validation(trainer) and trainer.received_sigterm and hasattr(connector, "received_sigterm"):
            connector.received_sigterm = False  # until on_validation_end
            self._held = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._fit_validation(trainer) or self.saved is not None:
            return
        # every process decides alike: saving a checkpoint is collective
        if trainer.strategy.reduce_boolean_decision(self._held or trainer.received_sigterm, all=False):
            if self._held:
                trainer._signal_connector.received_sigterm = True
            self.saved = last_checkpoint_path(trainer)
            if self.saved is not None:
                trainer.save_checkpoint(self.saved, weights_only=WHOLE)
            raise SIGTERMException

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if isinstance(exception, SIGTERMException):
            if self.saved and self.resume:
                todo = f"{self.saved} saved: {self.resume}"
            elif self.saved:
                todo = (f"resume with: lightning-mamba fit --config {shlex.quote(self._config)} --ckpt_path "
                        f"{shlex.quote(self.saved)}")
            else:
                todo = ("no checkpoint was saved then (checkpointing is off, or no step had finished): resume "
                        "from the newest one")
            cause = "Ctrl-C (SIGINT)" if self.interrupted else "SIGTERM"
            exception.code = f"stopped by {cause} at global step {trainer.global_step}: {todo}"
            exception.exit_status = 128 + (signal.SIGINT if self.interrupted else signal.SIGTERM)


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
        path = last_checkpoint_path(trainer, save_last_only=True)
        if path is not None:  # every rank decides alike (saving is collective)
            trainer.save_checkpoint(path, weights_only=WHOLE)


class BudgetPerRun(Timer):
    """Lightning's Timer (Trainer(max_time)) counting this run only. Lightning's restores the time a checkpoint has
    already trained, so a resumed run with the same max_time stops at once: a sweep's "run the same command again to
    resume" trained nothing. Here each run of the command gives each unfinished cell its whole budget again."""

    def load_state_dict(self, state_dict: dict) -> None:
        pass  # the elapsed time of earlier runs is not this run's
