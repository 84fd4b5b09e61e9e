"""What ``lightning-mamba predict`` leaves behind: the per-token next-token losses of ``MambaLitModule.predict_step``,
written by a Lightning ``BasePredictionWriter`` (LightningCLI itself discards what ``trainer.predict`` returns, so
the command computed them and kept nothing)."""

from __future__ import annotations

import io
import os

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from ..atomic import atomic_write

FILE = "token_losses.pt"


class TokenLossWriter(BasePredictionWriter):
    """Write the prediction epoch's per-token losses to ``<out_dir>/token_losses.pt`` (default out_dir: the run
    directory of the predict run, ``trainer.log_dir``, or ``trainer.default_root_dir`` without a logger), atomically:
    ``{"token_losses": (rows, seq_len) float32, "sample_indices": the held-out sample of each row (or None),
    "ckpt_path": ...}``.
    Each process of a multi-process run writes its own rows to ``token_losses.rank<r>.pt``. Read it with
    ``torch.load(path, weights_only=True)``."""

    def __init__(self, out_dir: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.out_dir = out_dir
        self.path: str | None = None

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions, batch_indices) -> None:
        if not predictions:
            return
        losses = torch.cat([p["token_losses"].float().cpu() for p in predictions])
        folder = self.out_dir or trainer.log_dir or trainer.default_root_dir
        name = FILE if trainer.world_size == 1 else FILE.replace(".pt", f".rank{trainer.global_rank}.pt")
        self.path = os.path.join(folder, name)
        record = {"token_losses": losses, "sample_indices": sample_indices(batch_indices),
                  "ckpt_path": None if trainer.ckpt_path is None else str(trainer.ckpt_path)}
        buffer = io.BytesIO()
        torch.save(record, buffer)
        atomic_write(self.path, lambda f: f.write(buffer.getvalue()))
        rank_zero_info(f"predict: per-token losses of {losses.shape[0]} rows x {losses.shape[1]} tokens (mean "
                       f"{losses.mean():.4f}) written to {os.path.relpath(self.path)}")


def sample_indices(batch_indices) -> list[int] | None:
    """The dataset index of each predicted row, in order: Lightning hands them per dataloader and batch (empty
    where its sampler does not report them)."""
    flat = [int(i) for loader in (batch_indices or []) for batch in loader for i in batch]
    return flat or None
