"""The paper's forgetting criterion (Stuffed Mamba §4.2) on a bucket-averaged loss-vs-position curve.

A model *fails* (does not learn to forget, "state collapse") if the bucket-averaged loss at any position
exceeds ``threshold`` (2) x the maximum bucket-averaged loss within the first T_train positions. As in the paper's
own evaluation, the first and the last bucket are left out before judging: the first (almost no context, the
highest loss of the curve) would set a reference whose double often lies above the loss of a uniform guess, so
the test could hardly fail; the last may be short, and is the noisiest.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


def threshold_problem(threshold: float) -> str | None:
    """Why ``threshold`` cannot be the criterion's factor (None when it can): it is a loss ratio, and at 1 or below
    the window's own buckets (and any noise past it) would count as blow-ups."""
    if isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 1:
        return None
    return (f"must be a finite number > 1 (got {threshold}): it is a loss ratio, a bucket fails above threshold x "
            f"the largest loss within T_train (the paper's is 2)")


def bucket_problem(bucket: int, seq_len: int) -> str | None:
    """Why ``bucket`` cannot be the criterion's bucket at T_train ``seq_len`` (None when it can): the first bucket is
    left out, so the reference needs a second one ending within T_train."""
    if type(bucket) is int and 1 <= bucket <= seq_len // 2:
        return None
    return (f"must be a whole number between 1 and half the training length, {seq_len // 2} (got {bucket}): the "
            f"criterion leaves the first bucket out, and its reference needs another one ending within {seq_len}")


@dataclass
class ForgettingVerdict:
    # True: no judged bucket exceeds threshold x max_in_window (passes, "learned to forget"); False: one does;
    # None: undetermined (``undetermined`` says why: a non-finite loss, e.g. a diverged checkpoint's)
    forgets: bool | None
    blowup_position: int | None  # last position of the first bucket that exceeds it; None if none does
    max_in_window: float  # max judged bucket mean among buckets ending at or before T_train (the reference)
    ratio_long_over_in: float | None  # mean[4T, 16T] / mean[T/2, T] (claim 2); None if the curve ends before 16T
    threshold: float
    bucket: int | None
    seq_len: int  # T_train
    evaluated_to: int  # last position of the curve: the verdict says nothing about later positions
    # Set by the pipeline (analysis.forgetting) from per-row losses; None when judged from a curve alone.
    ratio_16_64x: float | None = None  # mean[16T, 64T] / mean[T/2, T]; None if the rows end before 64T
    ratio_16_64x_lo: float | None = None  # its bootstrap 95% interval over rows
    ratio_16_64x_hi: float | None = None
    rows: int | None = None  # rows averaged
    undetermined: str | None = None  # why there is no verdict (forgets None); None when there is one

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        """The verdict for people: "forgets" or "FAILS to forget", the blow-up position ("none" rather than -1)
        and the ratios where measured."""
        return verdict_text(self.to_dict())


def verdict_text(v: dict) -> str:
    """A verdict dict (``ForgettingVerdict.to_dict()``, as saved in the analyses' JSON) in one line of words."""
    pos = v.get("blowup_position")
    pos = None if pos is None or pos < 0 else int(pos)  # -1 (TensorBoard's "none") is no position
    if v.get("forgets") is None:
        return f"undetermined ({v.get('undetermined') or 'no verdict'})"
    if v.get("forgets"):
        text = "forgets (blow-up: none"
    else:
        where = f"{pos}" if pos is None or not v.get("seq_len") else f"{pos} ({pos / v['seq_len']:.1f} x T)"
        text = f"FAILS to forget (blow-up at position {where if pos is not None else 'none'}"
    ratios = [f"{name} {v[key]:.3f}" for key, name in (("ratio_long_over_in", "ratio [4T,16T]/[T/2,T]"),
                                                        ("ratio_16_64x", "ratio [16T,64T]/[T/2,T]"))
              if v.get(key) is not None]
    return text + "".join(f", {r}" for r in ratios) + ")"


VERDICT_WORDS = {True: "forgets", False: "FAILS", None: "undetermined"}  # a cell's verdict in a title or table


def verdict_word(v: dict, reason: bool | str = False) -> str:
    """The verdict where there is room for a few words (a title, a table cell, a log line): "forgets",
    "FAILS to forget" or "undetermined" (no verdict: ``forgets`` is None). ``reason=True`` adds an undetermined
    verdict's reason in parentheses, ``reason="short"`` its first clause only (e.g. "the loss is not finite")."""
    if v.get("forgets") is None:
        why = v.get("undetermined")
        if not reason or not why:
            return "undetermined"
        return f"undetermined ({why.split(' (', 1)[0] if reason == 'short' else why})"
    return "forgets" if v["forgets"] else "FAILS to forget"


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

    The first and the last bucket are not judged (see the module's docstring): the reference is the maximum of the
    other buckets within the first T_train positions, and a blow-up is any other bucket above threshold x it.
    ``ratio_long_over_in`` (on the whole curve) is the stricter companion.

    A curve that ends at or before T_train cannot fail; ``evaluated_to`` says how far it was evaluated."""
    positions = np.asarray(positions, dtype=np.int64)
    curve = np.asarray(curve, dtype=np.float64)
    if positions.shape != curve.shape or positions.size == 0:
        raise ValueError("positions and curve must be non-empty and of the same length")
    if seq_len < 1:
        raise ValueError(f"seq_len (T_train) must be >= 1 (got {seq_len})")
    judged_pos, judged = positions[1:-1], curve[1:-1]
    in_window = judged_pos <= seq_len
    if not in_window.any():
        raise ValueError(f"no bucket but the first ends within the first seq_len={seq_len} positions (the first and "
                         f"the last bucket are not judged): use a bucket <= seq_len / 2 and a curve of at least 3 "
                         f"buckets (got buckets ending at {positions[:3].tolist()}{'...' if positions.size > 3 else ''})")
    bad = np.flatnonzero(~np.isfinite(curve))
    if bad.size:  # NaN compares false with everything: the test would pass a diverged model as "forgets"
        return ForgettingVerdict(
            forgets=None, blowup_position=None, max_in_window=float("nan"), ratio_long_over_in=None,
            threshold=threshold, bucket=bucket, seq_len=seq_len, evaluated_to=int(positions[-1]),
            undetermined=f"the loss is not finite ({curve[bad[0]]} in the bucket ending at position "
                         f"{int(positions[bad[0]])}, {bad.size} of {curve.size} buckets): the weights are likely "
                         f"diverged; analyze an earlier checkpoint")
    max_in = float(judged[in_window].max())
    over = np.flatnonzero(judged > threshold * max_in)
    in_ = _window_mean(positions, curve, seq_len / 2, seq_len)
    long = _window_mean(positions, curve, 4 * seq_len, 16 * seq_len)
    return ForgettingVerdict(
        forgets=over.size == 0,
        blowup_position=int(judged_pos[over[0]]) if over.size else None,
        max_in_window=max_in,
        ratio_long_over_in=None if in_ is None or long is None else long / in_,
        threshold=threshold,
        bucket=bucket,
        seq_len=seq_len,
        evaluated_to=int(positions[-1]),
    )


def default_bucket(seq_len: int) -> int:
    """T_train / 8, at least 16 tokens, at most T_train / 2 (so that a judged bucket lies within T_train once the
    first is left out)."""
    return max(min(max(seq_len // 8, 16), seq_len // 2), 1)
