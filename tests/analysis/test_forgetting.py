"""The forgetting pipeline on per-row, per-position losses: a real blow-up past T_train is caught, a flat curve and
a curve with only a high first bucket are not; ratio_16_64x and its bootstrap interval over rows."""

import numpy as np
import pytest
import torch

from lightning_mamba.analysis.evaluator import token_losses
from lightning_mamba.analysis.forgetting import (
    DEFAULT_EVAL_ROWS,
    DEFAULT_MAX_MULTIPLE,
    bootstrap_ratio,
    forgetting_report,
    measure_forgetting,
)

T = 32  # default bucket 16: the first bucket is positions 1..16
N = DEFAULT_MAX_MULTIPLE * T  # rows evaluated to 64 T


def rows_of(base: np.ndarray, n_rows: int = DEFAULT_EVAL_ROWS, seed: int = 0) -> np.ndarray:
    """Per-row, per-position losses around ``base`` (n,): documents differ (a per-row offset) and tokens are noisy."""
    rng = np.random.default_rng(seed)
    offsets = 0.3 * rng.standard_normal((n_rows, 1))
    return np.clip(base + offsets + 1.0 * rng.standard_normal((n_rows, base.size)), 0.0, None)


def positions(n: int = N) -> np.ndarray:
    return np.arange(1, n + 1)


def test_flat_rows_forget_with_a_ratio_near_one():
    r = forgetting_report(rows_of(np.full(N, 3.0)), T)
    v = r.verdict
    assert v.forgets and v.blowup_position is None and v.rows == DEFAULT_EVAL_ROWS and v.evaluated_to == N
    assert v.ratio_16_64x_lo <= 1.0 <= v.ratio_16_64x_hi and v.ratio_16_64x == pytest.approx(1.0, abs=0.05)
    assert list(r.loss_at) == [1, 2, 4, 8, 16, 32, 64]


def test_rows_rising_past_train_length_fail():
    pos = positions()
    base = np.where(pos <= T, 3.0, 3.0 + 6.0 * (pos - T) / (N - T))  # 3 within T_train, 9 at 64 T
    v = forgetting_report(rows_of(base), T).verdict
    assert not v.forgets and v.blowup_position > 16 * T  # above 2 x ~3 from about half way
    assert v.ratio_16_64x > 1.8 and v.ratio_16_64x_lo > 1.5


def test_a_high_first_bucket_alone_does_not_fail():
    base = np.full(N, 3.0)
    base[:16] = 10.0  # almost no context: far above anything later, and above 2 x the rest
    r = forgetting_report(rows_of(base), T)
    assert r.bucket == 16 and r.verdict.forgets and r.verdict.max_in_window < 4.0


def test_a_high_first_bucket_does_not_hide_a_blowup():
    base = np.full(N, 3.0)
    base[:16] = 10.0
    base[8 * T:] = 7.5  # 7.5 < 2 x 10: judged against the first bucket this would pass
    v = forgetting_report(rows_of(base), T).verdict
    assert not v.forgets and v.blowup_position == 8 * T + 16


def test_a_high_last_bucket_alone_does_not_fail():
    base = np.full(N + 5, 3.0)
    base[-5:] = 20.0  # a short last bucket of 5 positions
    v = forgetting_report(rows_of(base), T).verdict
    assert v.forgets and v.evaluated_to == N + 5


def test_bootstrap_interval_contains_the_ratio_and_shrinks_with_more_rows():
    pos = positions()
    base = np.where(pos <= T, 3.0, 3.6)
    many = rows_of(base, n_rows=128, seed=1)
    few = forgetting_report(many[:8], T).verdict
    all_ = forgetting_report(many, T).verdict
    for v in (few, all_):
        assert v.ratio_16_64x_lo < v.ratio_16_64x < v.ratio_16_64x_hi
    assert all_.ratio_16_64x_lo < 1.2 < all_.ratio_16_64x_hi
    assert (all_.ratio_16_64x_hi - all_.ratio_16_64x_lo) < 0.6 * (few.ratio_16_64x_hi - few.ratio_16_64x_lo)


def test_bootstrap_ratio_resamples_rows_with_a_seed():
    denominator = np.array([2.0, 3.0, 4.0, 5.0])
    assert bootstrap_ratio(2 * denominator, denominator) == pytest.approx((2.0, 2.0))  # every resample: 2
    rng = np.random.default_rng(0)
    numerator, denominator = rng.uniform(1, 9, 20), rng.uniform(2, 5, 20)
    lo, hi = bootstrap_ratio(numerator, denominator)
    assert lo < numerator.mean() / denominator.mean() < hi
    assert (lo, hi) == bootstrap_ratio(numerator, denominator)  # seeded: the same interval every time
    assert (lo, hi) != bootstrap_ratio(numerator, denominator, seed=1)
    with pytest.raises(ValueError, match="same"):
        bootstrap_ratio(numerator, denominator[:3])


def test_rows_ending_before_64T_have_no_ratio_but_the_rest():
    r = forgetting_report(rows_of(np.full(16 * T, 3.0), n_rows=4), T)
    v = r.verdict
    assert v.ratio_16_64x is None and v.ratio_16_64x_lo is None and v.ratio_long_over_in is not None
    assert v.rows == 4 and list(r.loss_at) == [1, 2, 4, 8, 16]
    scalars = r.scalars("lengthgen/")
    assert scalars["lengthgen/ratio_16_64x"] is None and scalars["lengthgen/forgets"] == 1.0
    d = r.to_dict()
    assert d["verdict"]["rows"] == 4 and d["evaluated_to"] == 16 * T and len(d["per_position_loss"]) == 16 * T
    explicit = forgetting_report(rows_of(np.full(16 * T, 3.0), n_rows=4), T, multiples=(1, 64))
    assert explicit.loss_at[64] is None and explicit.loss_at[1] is not None


def test_measure_forgetting_runs_the_model_then_the_same_report(lm):
    tokens = torch.randint(0, 64, (2, 8 * 4 + 1))
    report = measure_forgetting(lm, tokens, 4, piece_len=16)
    expected = forgetting_report(token_losses(lm, tokens, 16), 4)
    np.testing.assert_allclose(report.per_position, expected.per_position)
    assert report.verdict == expected.verdict and report.bucket == 2 and report.rows == 2
