"""Stop (or skip) at the step where the loss or a gradient stops being finite, naming what went first; the
checkpoints that hold the weights which failed are put aside, and the message says how to go on from the last good one."""

from __future__ import annotations

import glob
import os
import shlex

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_warn

from ..errors import UserError

MODES = ("stop", "skip")
ASIDE = ".nonfinite"  # suffix of the checkpoints put aside: kept for a look, never picked up as *.ckpt


class NonFiniteError(UserError, RuntimeError):
    """The loss or a gradient is NaN/Inf; the message is one line naming the step and the first such tensor."""


def _offer_grad_norm(pl_module: L.LightningModule, grad_norm: torch.Tensor | None) -> None:
    """Hands this step's total gradient norm to a module that can reuse it (MambaLitModule's norm clipping, which
    would compute the same norm again); only where the guard leaves the gradients as they are."""
    offer = getattr(pl_module, "offer_grad_norm", None)
    if grad_norm is not None and offer is not None:
        offer(grad_norm)


class NanGuard(L.Callback):
    """Checks every optimizer step that the loss and the gradients are finite.

    One check per step: the losses of the step's batches and the total gradient norm are tested together
    (a single host sync, or none: see below), and all processes share the verdict (one fails: all stop or skip). Only when that fails
    are the tensors searched for the first non-finite one, in the order they were computed: a parameter (a NaN
    weight), then the loss, then a gradient. Under fp16 mixed precision the gradient check is left to the grad
    scaler, which skips overflowing steps itself.

    With a fused optimizer (AdamW ``fused=True``, what training on CUDA uses) on one process and without a grad
    scaler, the check does not wait for the GPU: the step's verdict goes to the optimizer as its ``found_inf``
    tensor, so a non-finite step leaves the weights and the optimizer's state untouched on the device, and the host
    reads the verdict one step later (a sync every step would leave the GPU idle while the host prepares the next
    one: half the speed of the study's small cells), or at once where a checkpoint or a validation may follow. The
    stop or the warning names the step that failed; the step after it may have run.

    Args:
        on_nonfinite: 'stop': raise :class:`NonFiniteError` naming the global step and the first non-finite
            tensor, before the optimizer applies anything. 'skip': drop that step's gradients (the parameters
            are not updated; the step still counts), warn, and count it in ``train/skipped_batches``.
        max_skips_in_a_row: In 'skip' mode, stop anyway after this many consecutive skipped steps (the
            weights themselves are then likely broken).
    """

    def __init__(self, on_nonfinite: str = "stop", max_skips_in_a_row: int = 10):
        if on_nonfinite not in MODES:
            raise ValueError(f"on_nonfinite={on_nonfinite!r} is unknown: use 'stop' or 'skip'")
        self.on_nonfinite, self.max_skips_in_a_row = on_nonfinite, max_skips_in_a_row
        self.skipped = 0  # over the whole run (kept in checkpoints)
        self._in_a_row = 0
        self._first_bad = 0  # the first of the non-finite steps in a row
        self._loss_failed = False  # whether one of them had a non-finite loss: the weights (unchanged since) fail
        self._saved_steps: set[int] = set()  # the global steps this run wrote checkpoints at
        self._losses: list[torch.Tensor] = []
        self._where = ""
        self._pending: tuple | None = None  # the deferred check's step whose verdict is not read yet
        self._logged_skipped: tuple | None = None  # (skipped, epoch) when train/skipped_batches was last logged

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._where = f"global step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx})"

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        losses, self._losses = self._losses, []
        graphed = getattr(pl_module, "graphed_update_verdict", None)
        if graphed is not None and graphed[0] == trainer.global_step:
            # the update ran as a CUDA graph (model.cuda_graph_update) with this check in it: a non-finite step was
            # skipped on the device, as the deferred check does; its verdict and norm are rewritten by the next
            # replay, so the norm is copied for the message
            self._defer(trainer, pl_module, graphed[1], losses, graphed[2].clone())
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        check_grads = getattr(trainer.precision_plugin, "scaler", None) is None
        checks = [torch.stack(losses).isfinite().all()] if losses else []
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads and check_grads else None
        if grad_norm is not None:
            checks.append(grad_norm.isfinite())
        if checks and check_grads and trainer.world_size == 1 and _takes_found_inf(optimizer):
            self._check_later(trainer, pl_module, optimizer, losses, grad_norm, checks)
            _offer_grad_norm(pl_module, grad_norm)  # the gradients stay as they are: the optimizer skips a bad step
            return
        bad = bool(checks) and not torch.stack([c.to(pl_module.device) for c in checks]).all()
        # Each rank sees its own losses (and under FSDP its own shard of the gradients): one rank's non-finite
        # step is every rank's, so that all stop or skip together.
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            self._in_a_row, self._loss_failed = 0, False
            _offer_grad_norm(pl_module, grad_norm)
        else:
            self._loss_failed = self._loss_failed or (bool(losses) and not bool(checks[0]))
            self._handle(trainer, pl_module, self._describe(pl_module, losses, grad_norm, check_grads))
        self._log_skipped(trainer, pl_module)

    def _check_later(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer, losses, grad_norm,
                     checks) -> None:
        """The deferred check (class docstring): the optimizer skips this step on the device if it is not finite;
        the verdict of the step before, long computed by now, is read and acted on."""
        bad = ~torch.stack([c.to(pl_module.device) for c in checks]).all()
        _unwrap(optimizer).found_inf = bad.float()
        self._defer(trainer, pl_module, bad, losses, grad_norm)

    def _defer(self, trainer: L.Trainer, pl_module: L.LightningModule, bad: torch.Tensor, losses, grad_norm) -> None:
        """Keep this step's verdict ``bad`` (a device bool) to read one step later; act on the step before's."""
        self._resolve(trainer, pl_module)
        self._log_skipped(trainer, pl_module)
        host = bad.to("cpu", non_blocking=True) if bad.is_cuda else bad
        event = None
        if bad.is_cuda:
            event = torch.cuda.Event()
            event.record()
        stacked = torch.stack(losses) if losses else None  # a copy: a CUDA graph's loss output is rewritten
        self._pending = (host, event, trainer.global_step, self._where, stacked, grad_norm)

    def _log_skipped(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """``train/skipped_batches`` as a host tensor (Lightning copies a Python number to the device, which waits for
        the GPU), logged at the logging steps and whenever the count changes (or an epoch starts: Lightning drops the
        step values then), so that the logger and callback_metrics see what logging it every step gave them, without
        Lightning's per-call cost (~0.3 ms of host time) at every step."""
        now = (self.skipped, trainer.current_epoch)
        if now != self._logged_skipped or trainer._logger_connector.should_update_logs:
            pl_module.log("train/skipped_batches", torch.tensor(float(self.skipped)))
            self._logged_skipped = now

    def _resolve(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Act on the pending step's verdict (its update was already skipped on the device if it failed)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            host, event, step, where, losses, grad_norm = pending
            if event is not None:
                event.synchronize()
            if not bool(host):
                self._in_a_row, self._loss_failed = 0, False
            else:
                loss_bad = losses is not None and not bool(losses.isfinite().all())
                self._loss_failed = self._loss_failed or loss_bad
                losses_list = list(losses) if losses is not None else []
                self._where = where
                message = self._describe(pl_module, losses_list, grad_norm, check_grads=False,
                                         otherwise="a gradient is not finite")  # one process: it was ours
                self._handle(trainer, pl_module, message, step=step, skipped_already=True)

    # A checkpoint must not hold a step whose verdict is unread: read it first wherever one may be written (callbacks
    # run before ModelCheckpoint, which Lightning puts last).
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._pending is not None and _checkpoint_may_follow(trainer):
            self._resolve(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resolve(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resolve(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._saved_steps.add(trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resolve(trainer, pl_module)  # the last step's deferred verdict
        # 'skip' that ended in skipped steps, one of them with a non-finite loss: the weights the run leaves (unchanged
        # since) give one. A finite loss with a non-finite gradient does not condemn them (a bad batch).
        if self._in_a_row and trainer.strategy.reduce_boolean_decision(self._loss_failed, all=False):
            raise self._stop(trainer, pl_module, f"the run ended with its last {self._in_a_row} steps (from global step "
                                                 f"{self._first_bad}) skipped, the loss of its weights non-finite: they "
                                                 f"are broken")

    def _describe(self, pl_module: L.LightningModule, losses: list[torch.Tensor], grad_norm, check_grads: bool,
                  otherwise: str = "another process's loss or gradients are not finite") -> str:
        first = None
        for name, p in pl_module.named_parameters():
            if not p.isfinite().all():
                first = f"parameter {name} has {int((~p.isfinite()).sum())}/{p.numel()} non-finite values"
                break
        bad_loss = next((loss for loss in losses if not loss.isfinite()), None)
        if first is None and bad_loss is not None:
            first = f"the loss is {bad_loss.item()}"
        if first is None and check_grads:
            for name, p in pl_module.named_parameters():
                if p.grad is not None and not p.grad.isfinite().all():
                    bad = int((~p.grad.isfinite()).sum())
                    first = f"the gradient of {name} has {bad}/{p.numel()} non-finite values"
                    break
        if first is None:
            first = otherwise
        loss = ", ".join(f"{x.item():.4g}" for x in losses) or "n/a"
        norm = f"{grad_norm.item():.4g}" if grad_norm is not None else "n/a"
        return f"non-finite values at {self._where}: {first} (loss {loss}, grad norm {norm})"

    def _handle(self, trainer: L.Trainer, pl_module: L.LightningModule, message: str, step: int | None = None,
                skipped_already: bool = False) -> None:
        if not self._in_a_row:
            self._first_bad = trainer.global_step if step is None else step
        if self.on_nonfinite == "stop":
            raise self._stop(trainer, pl_module, message, "; or skip such batches with on_nonfinite=skip")
        self.skipped += 1
        self._in_a_row += 1
        if self._in_a_row > self.max_skips_in_a_row:
            raise self._stop(trainer, pl_module, f"{message}, and the {self.max_skips_in_a_row} steps before it were "
                                                 f"skipped too")
        if not skipped_already:
            for p in pl_module.parameters():
                p.grad = None  # the optimizer leaves parameters without a gradient alone
        rank_zero_warn(f"{message}: skipped this batch ({self.skipped} so far)")

    def _stop(self, trainer: L.Trainer, pl_module: L.LightningModule, message: str, hint: str = "") -> NonFiniteError:
        """The error that ends the run, once the checkpoints holding the weights that failed are put aside."""
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                cb.save_on_exception = False  # it would write the failed state
        config = run_config_path(trainer)
        if not trainer.is_global_zero:  # rank 0 moves the files and tells what to run
            return NonFiniteError(f"{message}{hint}")
        put_aside, good = self._sort_checkpoints(trainer, pl_module)
        aside = f"put aside {', '.join(put_aside)} (*{ASIDE}: the weights that failed); " if put_aside else ""
        lr = (pl_module.hparams.get("lr") or 0) / 10
        if good:
            command = f"lightning-mamba fit --config {shlex.quote(config)} --ckpt_path {shlex.quote(good)} --model.lr {lr:.3g}"
            todo = f"resume from the last good checkpoint with a lower lr: {command}"
        else:
            command = f"lightning-mamba fit --config {shlex.quote(config)} --model.lr {lr:.3g}"
            todo = f"no checkpoint of good weights is left: start again with a lower lr: {command}"
        return NonFiniteError(f"{message}: {aside}{todo}{hint}")

    def _sort_checkpoints(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[list[str], str | None]:
        """Put aside this run's checkpoints of the steps from the first non-finite one on (they hold the weights that
        failed: the optimizer has not stepped since), unless their weights are finite while those in memory are not
        (changed after the save, so not the ones that failed). Returns (the names put aside, the newest checkpoint
        left)."""
        params_finite = all(bool(p.isfinite().all()) for p in pl_module.parameters())
        put_aside, left = [], []
        dirs = {cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)}
        for path in sorted(p for d in dirs if os.path.isdir(d) for p in glob.glob(os.path.join(glob.escape(d), "*.ckpt"))):
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                step = int(ckpt["global_step"])
            except Exception:
                continue  # not a checkpoint of ours (or damaged): leave it alone
            if step in self._saved_steps and step >= self._first_bad and (
                    params_finite or not _finite(ckpt.get("state_dict", {}))):
                os.replace(path, path + ASIDE)
                put_aside.append(os.path.basename(path))
            elif step <= trainer.global_step:  # not one of a later run's (same folder)
                left.append((step, "last" in os.path.basename(path), path))
        return put_aside, max(left)[2] if left else None

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


def run_config_path(trainer: L.Trainer) -> str:
    """The config.yaml LightningCLI saved for this run (a broadcast: call it on every process), else 'CONFIG'."""
    log_dir = trainer.log_dir
    return next((os.path.join(log_dir, cb.config_filename) for cb in trainer.callbacks
                 if isinstance(cb, SaveConfigCallback) and log_dir), "CONFIG")


def _checkpoint_may_follow(trainer: L.Trainer) -> bool:
    """Whether a checkpoint may be written at the end of this batch (ModelCheckpoint's step or time interval, the
    last step, or SIGTERM's checkpoint)."""
    step = trainer.global_step
    if trainer.received_sigterm or (trainer.max_steps > 0 and step >= trainer.max_steps) or trainer.should_stop:
        return True
    for cb in trainer.checkpoint_callbacks:
        every = getattr(cb, "_every_n_train_steps", 0)
        if (every and step % every == 0) or getattr(cb, "_train_time_interval", None) is not None:
            return True
    return False


def _unwrap(optimizer):
    return getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one


def _takes_found_inf(optimizer) -> bool:
    """A fused torch Adam/AdamW/SGD: its step reads ``found_inf`` and skips (on the device) when it is non-zero."""
    optimizer = _unwrap(optimizer)
    return (isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD))
            and bool(optimizer.defaults.get("fused")))


def _finite(state: dict) -> bool:
    return all(bool(t.isfinite().all()) for t in state.values() if torch.is_tensor(t) and t.is_floating_point())
