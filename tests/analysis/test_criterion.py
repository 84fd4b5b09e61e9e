import numpy as np
import pytest

from lightning_mamba.analysis import forgetting_report, judge_forgetting

T = 64


def positions(n, bucket=8):
    return np.arange(bucket, n + 1, bucket)


def test_flat_curve_forgets():
    pos = positions(16 * T)
    v = judge_forgetting(pos, np.full(pos.shape, 3.0), T, bucket=8)
    assert v.forgets and v.blowup_position is None and v.max_in_window == 3.0
    assert v.ratio_long_over_in == pytest.approx(1.0) and v.evaluated_to == 16 * T


def test_curve_exploding_past_train_length_fails_at_the_right_position():
    pos = positions(16 * T)
    curve = np.where(pos <= T, 3.0, 3.0 + 0.01 * (pos - T))  # exceeds 6 when pos - T > 300
    v = judge_forgetting(pos, curve, T, bucket=8)
    first = int(pos[np.argmax(curve > 6.0)])
    assert not v.forgets and v.blowup_position == first and 300 < first - T <= 308
    assert v.ratio_long_over_in > 2


def test_noisy_but_bounded_curve_forgets_and_high_early_loss_sets_the_reference():
    rng = np.random.default_rng(0)
    pos = positions(16 * T)
    curve = 3.0 + 0.3 * rng.standard_normal(pos.shape)
    curve[0] = 6.0  # little context at the start: the literal max within T_train is this bucket
    v = judge_forgetting(pos, curve, T, bucket=8)
    assert v.forgets and v.max_in_window == 6.0
    assert v.ratio_long_over_in == pytest.approx(1.0, abs=0.1)


def test_threshold_is_a_parameter():
    pos = positions(4 * T)
    curve = np.where(pos <= T, 3.0, 4.0)
    assert judge_forgetting(pos, curve, T).forgets
    v = judge_forgetting(pos, curve, T, threshold=1.2)
    assert not v.forgets and v.blowup_position == T + 8


def test_short_curves():
    pos = positions(4 * T)
    v = judge_forgetting(pos, np.full(pos.shape, 3.0), T)
    assert v.forgets and v.ratio_long_over_in is None and v.evaluated_to == 4 * T
    pos = positions(T // 2)  # never reaches T_train: nothing beyond it, ratio unknown
    v = judge_forgetting(pos, np.full(pos.shape, 3.0), T)
    assert v.forgets and v.ratio_long_over_in is None and v.evaluated_to == T // 2
    with pytest.raises(ValueError, match="bucket <= seq_len"):
        judge_forgetting(np.array([2 * T]), np.array([3.0]), T)


def test_from_per_position_losses_with_default_bucket():
    losses = np.full((2, 16 * T), 3.0)
    losses[:, 5 * T:] = 7.0
    v = forgetting_report(losses, T).verdict
    assert v.bucket == 16 and not v.forgets and v.blowup_position == 5 * T + 16
