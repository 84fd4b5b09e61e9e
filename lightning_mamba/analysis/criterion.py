"""The paper's forgetting criterion (Stuffed Mamba §4.2) on a bucket-averaged loss-vs-position curve.

A model *fails* (does not learn to forget, "state collapse") if the bucket-averaged loss at any position
exceeds ``threshold`` (2) x the maximum bucket-averaged loss within the first T_train positions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class ForgettingVerdict:
    forgets: bool  # True: no bucket exceeds threshold x max_in_window (passes, "learned to forget")
    blowup_position: int | None  # last position of the first bucket that exceeds it; None if none does
    max_in_window: float  # max bucket mean among buckets ending at or before T_train
    ratio_long_over_in: float | None  # mean[4T, 16T] / mean[T/2, T] (claim 2); None if the curve ends before 16T
    threshold: float
    bucket: int | None
    seq_len: int  # T_train
    evaluated_to: int  # last position of the curve: the verdict says nothing about later positions

    def to_dict(self) -> dict:
        return asdict(self)


def _window_mean(positions: np.ndarray, curve: np.ndarray, lo: float, hi: float) -> float | None:
    """Mean of the buckets whose last position lies in (lo, hi]; None if the curve does not reach hi."""
    if positions[-1] < hi:
        return None
    sel = (positions > lo) & (positions <= hi)
    return float(curve[sel].mean()) if sel.any() else None


def judge_forgetting(
    positions: np.ndarray,
    curve: np.ndarray,
    seq_len: int,
    threshold: float = 2.0,
    bucket: int | None = None,
) -> ForgettingVerdict:
    """Apply the criterion to a bucket curve (positions = each bucket's last position, see ``bucket_curve``).

    Literal reading of the paper: the reference is the *maximum* within the first T_train positions. That
    maximum usually sits in the first bucket, where the model has little context and the loss is highest,
    so the test is lenient: a curve fails only when it rises well above the short-context loss. We keep it
    literal (the paper's T_forget values depend on it); ``ratio_long_over_in`` is the stricter companion.

    A curve that ends at or before T_train cannot fail; ``evaluated_to`` says how far it was checked."""
    positions = np.asarray(positions, dtype=np.int64)
    curve = np.asarray(curve, dtype=np.float64)
    if positions.shape != curve.shape or positions.size == 0:
        raise ValueError("positions and curve must be non-empty and of the same length")
    if seq_len < 1:
        raise ValueError(f"seq_len (T_train) must be >= 1 (got {seq_len})")
    in_window = positions <= seq_len
    if not in_window.any():
        raise ValueError(f"no bucket ends within the first seq_len={seq_len} positions: use a bucket <= seq_len "
                         f"(first bucket ends at {positions[0]})")
    max_in = float(curve[in_window].max())
    over = np.flatnonzero(curve > threshold * max_in)
    in_ = _window_mean(positions, curve, seq_len / 2, seq_len)
    long = _window_mean(positions, curve, 4 * seq_len, 16 * seq_len)
    return ForgettingVerdict(
        forgets=over.size == 0,
        blowup_position=int(positions[over[0]]) if over.size else None,
        max_in_window=max_in,
        ratio_long_over_in=None if in_ is None or long is None else long / in_,
        threshold=threshold,
        bucket=bucket,
        seq_len=seq_len,
        evaluated_to=int(positions[-1]),
    )


def default_bucket(seq_len: int) -> int:
    """T_train / 8, at least 16 tokens (and never more than T_train)."""
    return min(max(seq_len // 8, 16), seq_len)
