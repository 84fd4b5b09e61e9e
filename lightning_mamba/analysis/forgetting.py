"""The forgetting pipeline, in one place: held-out rows -> per-position loss -> bucket curve -> the paper's verdict
-> loss at multiples of T_train. The training callback, ``analyze``, ``mitigate`` and the study's cells all go
through it, so their numbers mean the same thing.

    report = measure_forgetting(model, rows, seq_len=512)  # rows: (b, L + 1) held-out tokens
    report.verdict.forgets, report.loss_at[4], report.to_dict()
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .criterion import ForgettingVerdict, default_bucket, judge_forgetting
from .evaluator import bucket_curve, token_losses, window_mean

# Context lengths, in units of T_train, a loss is reported at (those the evaluated rows reach).
DEFAULT_MULTIPLES = tuple(2**k for k in range(11))  # 1, 2, 4, ..., 1024
DEFAULT_MAX_MULTIPLE = 16  # how far to evaluate, in units of T_train, unless told otherwise


def multiples_up_to(max_multiple: float) -> tuple[int, ...]:
    """The default multiples not beyond ``max_multiple``: the callback's default list, the default length's metrics."""
    return tuple(m for m in DEFAULT_MULTIPLES if m <= max_multiple)


def loss_at_multiple(losses: Tensor | np.ndarray, seq_len: int, multiple: int) -> float | None:
    """``loss@{m}x``: the mean loss over positions (m T/2, m T] and rows; None if the rows are shorter than m T."""
    return window_mean(losses, multiple * seq_len // 2, multiple * seq_len)


@dataclass
class ForgettingReport:
    """What the pipeline measured on one set of rows; ``to_dict()`` is JSON-able."""

    seq_len: int  # T_train
    bucket: int  # positions per bucket of the curve the verdict judged
    rows: int  # held-out rows averaged
    per_position: np.ndarray  # (n,) loss at positions 1..n, mean over rows
    positions: np.ndarray  # each bucket's last position (see ``bucket_curve``)
    curve: np.ndarray  # bucket means
    verdict: ForgettingVerdict
    loss_at: dict[int, float | None]  # multiple m -> loss@{m}x (None when the rows do not reach m T)

    @property
    def evaluated_to(self) -> int:
        """Positions evaluated (the row length minus one)."""
        return int(self.per_position.size)

    def metrics(self, prefix: str = "") -> dict[str, float | None]:
        """``{prefix}loss@{m}x`` for every multiple of the report."""
        return {f"{prefix}loss@{m}x": loss for m, loss in self.loss_at.items()}

    def scalars(self, prefix: str = "lengthgen/") -> dict[str, float | None]:
        """The logged scalars: loss@{m}x, forgets (1/0), blowup_position (-1 if none), ratio_4_16x."""
        v = self.verdict
        return {**self.metrics(prefix), f"{prefix}forgets": float(v.forgets),
                f"{prefix}blowup_position": -1 if v.blowup_position is None else v.blowup_position,
                f"{prefix}ratio_4_16x": v.ratio_long_over_in}

    def to_dict(self) -> dict:
        return {"seq_len": self.seq_len, "bucket": self.bucket, "rows": self.rows, "evaluated_to": self.evaluated_to,
                "verdict": self.verdict.to_dict(), "metrics": self.metrics(),
                "bucket_positions": self.positions.tolist(), "bucket_loss": self.curve.tolist(),
                "per_position_loss": self.per_position.tolist()}


def forgetting_report(
    losses: Tensor | np.ndarray,
    seq_len: int,
    bucket: int | None = None,
    threshold: float = 2.0,
    multiples: tuple[int, ...] | list[int] | None = None,
) -> ForgettingReport:
    """Per-position losses (rows, n) -> the report. ``multiples``: the loss@{m}x to report (None where the rows
    stop short); default: those of ``DEFAULT_MULTIPLES`` the rows reach."""
    losses = torch.as_tensor(losses, dtype=torch.float64)
    if losses.dim() == 1:
        losses = losses[None]
    n = losses.size(1)
    bucket = bucket or default_bucket(seq_len)
    positions, curve = bucket_curve(losses, bucket)
    verdict = judge_forgetting(positions, curve, seq_len, threshold, bucket)
    if multiples is None:
        multiples = [m for m in DEFAULT_MULTIPLES if m * seq_len <= n]
    return ForgettingReport(
        seq_len=seq_len, bucket=bucket, rows=int(losses.size(0)), per_position=losses.mean(0).numpy(),
        positions=positions, curve=curve, verdict=verdict,
        loss_at={int(m): loss_at_multiple(losses, seq_len, int(m)) for m in multiples},
    )


def measure_forgetting(
    model: torch.nn.Module,
    rows: Tensor,
    seq_len: int,
    bucket: int | None = None,
    threshold: float = 2.0,
    multiples: tuple[int, ...] | list[int] | None = None,
    *,
    piece_len: int = 2048,
    dtype: str | torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
) -> ForgettingReport:
    """``model`` on held-out ``rows`` (b, L + 1) tokens, state carried ``piece_len`` tokens at a time
    (:func:`.evaluator.token_losses`), then :func:`forgetting_report` of its per-position losses."""
    losses = token_losses(model, rows, piece_len, dtype, device, batch_size)
    return forgetting_report(losses, seq_len, bucket, threshold, multiples)
