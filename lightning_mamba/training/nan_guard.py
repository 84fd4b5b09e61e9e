"""Stop (or skip) at the step where the loss or a gradient stops being finite, naming what went first."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from ..errors import UserError

MODES = ("stop", "skip")
FIX = "lower model.lr or set trainer.gradient_clip_val and resume from the last checkpoint"


class NonFiniteError(UserError, RuntimeError):
    """The loss or a gradient is NaN/Inf; the message is one line naming the step and the first such tensor."""


class NanGuard(L.Callback):
    """Checks every optimizer step that the loss and the gradients are finite.

    One check per step: the losses of the step's batches and the total gradient norm are tested together
    (a single host sync), and all processes share the verdict (one fails: all stop or skip). Only when that fails
    are the tensors searched for the first non-finite one, in the order they were computed: a parameter (a NaN
    weight), then the loss, then a gradient. Under fp16 mixed precision the gradient check is left to the grad
    scaler, which skips overflowing steps itself.

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
        self._losses: list[torch.Tensor] = []
        self._where = ""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._where = f"global step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx})"

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        losses, self._losses = self._losses, []
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        check_grads = getattr(trainer.precision_plugin, "scaler", None) is None
        checks = [torch.stack(losses).isfinite().all()] if losses else []
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads and check_grads else None
        if grad_norm is not None:
            checks.append(grad_norm.isfinite())
        bad = bool(checks) and not torch.stack([c.to(pl_module.device) for c in checks]).all()
        # Each rank sees its own losses (and under FSDP its own shard of the gradients): one rank's non-finite
        # step is every rank's, so that all stop or skip together.
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            self._in_a_row = 0
        else:
            self._handle(pl_module, self._describe(pl_module, losses, grad_norm, check_grads))
        pl_module.log("train/skipped_batches", float(self.skipped))

    def _describe(self, pl_module: L.LightningModule, losses: list[torch.Tensor], grad_norm, check_grads: bool) -> str:
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
            first = "another process's loss or gradients are not finite"
        loss = ", ".join(f"{x.item():.4g}" for x in losses) or "n/a"
        norm = f"{grad_norm.item():.4g}" if grad_norm is not None else "n/a"
        return f"non-finite values at {self._where}: {first} (loss {loss}, grad norm {norm})"

    def _handle(self, pl_module: L.LightningModule, message: str) -> None:
        if self.on_nonfinite == "stop":
            raise NonFiniteError(f"{message}: {FIX}, or skip such batches with on_nonfinite=skip")
        self.skipped += 1
        self._in_a_row += 1
        if self._in_a_row > self.max_skips_in_a_row:
            raise NonFiniteError(f"{message}, and the {self.max_skips_in_a_row} steps before it were skipped too: "
                                 f"{FIX}")
        for p in pl_module.parameters():
            p.grad = None  # the optimizer leaves parameters without a gradient alone
        rank_zero_warn(f"{message}: skipped this batch ({self.skipped} so far)")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
