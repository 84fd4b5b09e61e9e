"""The forgetting pipeline, in one place: held-out rows -> per-position loss -> bucket curve -> the paper's verdict
-> loss at multiples of T_train, and the ratio mean[16T, 64T] / mean[T/2, T] with a bootstrap interval over rows.
The training callback, ``analyze``, ``mitigate`` and the study's cells all go through it, so their numbers mean
the same thing.

    report = measure_forgetting(model, rows, seq_len=512)  # rows: (b, L + 1) held-out tokens, L = 64 x 512
    report.verdict.forgets, report.verdict.ratio_16_64x, report.loss_at[4], report.to_dict()

The defaults follow the paper's evaluation: 64 x T_train, at least 32 rows averaged, the first and the last bucket
of the curve not judged (``criterion.judge_forgetting``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from .criterion import ForgettingVerdict, default_bucket, judge_forgetting
from .evaluator import bucket_curve, token_losses, window_mean

# Context lengths, in units of T_train, a loss is reported at (those the evaluated rows reach).
DEFAULT_MULTIPLES = tuple(2**k for k in range(11))  # 1, 2, 4, ..., 1024
DEFAULT_MAX_MULTIPLE = 64  # how far to evaluate, in units of T_train, unless told otherwise
DEFAULT_EVAL_ROWS = 32  # held-out rows averaged unless told otherwise (fewer: a wide interval on the ratio)
LONG_WINDOW = (16, 64)  # the ratio's numerator: positions (16T, 64T]; its denominator is (T/2, T]
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def multiples_up_to(max_multiple: float) -> tuple[int, ...]:
    """The default multiples not beyond ``max_multiple``: the callback's default list, the default length's metrics."""
    return tuple(m for m in DEFAULT_MULTIPLES if m <= max_multiple)


def loss_at_multiple(losses: Tensor | np.ndarray, seq_len: int, multiple: int) -> float | None:
    """``loss@{m}x``: the mean loss over positions (m T/2, m T] and rows; None if the rows are shorter than m T."""
    return window_mean(losses, multiple * seq_len // 2, multiple * seq_len)


def row_window_means(losses: Tensor, lo: int, hi: int) -> np.ndarray | None:
    """Each row's mean loss over positions (lo, hi]; None if the rows are shorter than hi."""
    if losses.size(1) < hi or hi <= lo:
        return None
    return losses[:, lo:hi].double().mean(1).numpy()


def bootstrap_ratio(
    numerator: np.ndarray,
    denominator: np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of mean(numerator) / mean(denominator) when the rows (pairs of per-row means) are
    resampled with replacement ``resamples`` times; seeded, so a report is reproducible."""
    numerator, denominator = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
    if numerator.shape != denominator.shape or numerator.ndim != 1 or numerator.size == 0:
        raise ValueError("numerator and denominator must be per-row means of the same, non-zero number of rows")
    idx = np.random.default_rng(seed).integers(0, numerator.size, size=(resamples, numerator.size))
    ratios = numerator[idx].mean(1) / denominator[idx].mean(1)
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def ratio_16_64x(losses: Tensor, seq_len: int) -> dict[str, float | None]:
    """mean loss over (16T, 64T] / mean over (T/2, T], and its bootstrap 95% interval over rows; None where the
    rows end before 64T."""
    long = row_window_means(losses, LONG_WINDOW[0] * seq_len, LONG_WINDOW[1] * seq_len)
    in_window = row_window_means(losses, seq_len // 2, seq_len)
    if long is None or in_window is None:
        return {"ratio_16_64x": None, "ratio_16_64x_lo": None, "ratio_16_64x_hi": None}
    lo, hi = bootstrap_ratio(long, in_window)
    return {"ratio_16_64x": float(long.mean() / in_window.mean()), "ratio_16_64x_lo": lo, "ratio_16_64x_hi": hi}


FAR_FRACTION = 0.25  # ratio_far's window: the last quarter of the evaluated positions


def far_window(evaluated_to: int, fraction: float = FAR_FRACTION) -> tuple[int, int]:
    """ratio_far's positions (lo, hi]: the last ``fraction`` of positions 1..evaluated_to."""
    return int(evaluated_to * (1 - fraction)), int(evaluated_to)


def far_ratio(losses: torch.Tensor, seq_len: int, prefix: str = "") -> dict[str, float | None]:
    """``ratio_far``: the mean loss over :func:`far_window` of the rows (b, n) over the mean over (T/2, T] (the
    in-window reference of ratio_16_64x), with its bootstrap 95% interval over rows (``_lo``, ``_hi``). It reads the
    rise where the evaluation ends, however far that is (ratio_16_64x stops at 64T). None where there is no
    reference (rows shorter than T)."""
    lo, hi = far_window(losses.size(1))
    far, ref = row_window_means(losses, lo, hi), row_window_means(losses, seq_len // 2, seq_len)
    keys = [f"{prefix}ratio_far{s}" for s in ("", "_lo", "_hi")]
    if far is None or ref is None:
        return dict.fromkeys(keys)
    return dict(zip(keys, (float(far.mean() / ref.mean()), *bootstrap_ratio(far, ref))))


@dataclass
class ForgettingReport:
    """What the pipeline measured on one set of rows; ``to_dict()`` is JSON-able."""

    seq_len: int  # T_train
    bucket: int  # positions per bucket of the curve the verdict judged
    rows: int  # held-out rows averaged (the bootstrap resamples them)
    per_position: np.ndarray  # (n,) loss at positions 1..n, mean over rows
    positions: np.ndarray  # each bucket's last position (see ``bucket_curve``)
    curve: np.ndarray  # bucket means
    verdict: ForgettingVerdict  # with ratio_16_64x, its interval and the rows
    loss_at: dict[int, float | None]  # multiple m -> loss@{m}x (None when the rows do not reach m T)
    far: dict[str, float | None]  # ratio_far and its interval (:func:`far_ratio`), over :attr:`far_window`

    @property
    def evaluated_to(self) -> int:
        """Positions evaluated (the row length minus one)."""
        return int(self.per_position.size)

    @property
    def far_window(self) -> tuple[int, int]:
        """ratio_far's positions (lo, hi] (:func:`far_window`)."""
        return far_window(self.evaluated_to)

    def far_metrics(self, prefix: str = "") -> dict[str, float | None]:
        """``{prefix}ratio_far``, ``_lo``, ``_hi``."""
        return {prefix + k: v for k, v in self.far.items()}

    def metrics(self, prefix: str = "") -> dict[str, float | None]:
        """``{prefix}loss@{m}x`` for every multiple of the report."""
        return {f"{prefix}loss@{m}x": loss for m, loss in self.loss_at.items()}

    def scalars(self, prefix: str = "lengthgen/") -> dict[str, float | None]:
        """The logged scalars: loss@{m}x, forgets (1/0), blowup_position (-1 if none), ratio_4_16x, ratio_16_64x
        and its interval (ratio_16_64x_lo, ratio_16_64x_hi). An undetermined verdict has neither forgets nor
        blowup_position (None: not logged; -1 would say "no blow-up", 0 "fails")."""
        v = self.verdict
        undetermined = v.forgets is None
        return {**self.metrics(prefix), f"{prefix}forgets": None if undetermined else float(v.forgets),
                f"{prefix}blowup_position": None if undetermined else
                -1 if v.blowup_position is None else v.blowup_position,
                f"{prefix}ratio_4_16x": v.ratio_long_over_in, f"{prefix}ratio_16_64x": v.ratio_16_64x,
                f"{prefix}ratio_16_64x_lo": v.ratio_16_64x_lo, f"{prefix}ratio_16_64x_hi": v.ratio_16_64x_hi}

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
    """Per-position losses (rows, n) -> the report: the verdict on the bucket curve (first and last bucket not
    judged), ratio_16_64x and ratio_far with their bootstrap intervals over rows, loss@{m}x. ``multiples``: the loss@{m}x to report
    (None where the rows stop short); default: those of ``DEFAULT_MULTIPLES`` the rows reach."""
    losses = torch.as_tensor(losses, dtype=torch.float64)
    if losses.dim() == 1:
        losses = losses[None]
    n = losses.size(1)
    bucket = bucket or default_bucket(seq_len)
    positions, curve = bucket_curve(losses, bucket)
    verdict = replace(judge_forgetting(positions, curve, seq_len, threshold, bucket), **ratio_16_64x(losses, seq_len),
                      rows=int(losses.size(0)))
    if multiples is None:
        multiples = [m for m in DEFAULT_MULTIPLES if m * seq_len <= n]
    return ForgettingReport(
        seq_len=seq_len, bucket=bucket, rows=int(losses.size(0)), per_position=losses.mean(0).numpy(),
        positions=positions, curve=curve, verdict=verdict,
        loss_at={int(m): loss_at_multiple(losses, seq_len, int(m)) for m in multiples},
        far=far_ratio(losses, seq_len),
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
    chunk_size: int | str | None = None,
) -> ForgettingReport:
    """``model`` on held-out ``rows`` (b, L + 1) tokens, state carried ``piece_len`` tokens at a time, the scan in
    chunks of ``chunk_size`` (:func:`.evaluator.evaluation_chunk`; speed only) (:func:`.evaluator.token_losses`),
    then :func:`forgetting_report` of its per-position losses."""
    losses = token_losses(model, rows, piece_len, dtype, device, batch_size, chunk_size)
    return forgetting_report(losses, seq_len, bucket, threshold, multiples)
