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


def test_noisy_but_bounded_curve_forgets_and_the_first_bucket_is_not_the_reference():
    rng = np.random.default_rng(0)
    pos = positions(16 * T)
    curve = 3.0 + 0.3 * rng.standard_normal(pos.shape)
    curve[0] = 6.0  # little context at the start: the highest loss of the curve, left out of the judgement
    v = judge_forgetting(pos, curve, T, bucket=8)
    assert v.forgets and v.max_in_window == curve[1:T // 8].max() < 6.0
    assert v.ratio_long_over_in == pytest.approx(1.0, abs=0.1)


def test_the_first_and_last_buckets_are_not_judged():
    pos = positions(16 * T)
    high_start = np.full(pos.shape, 3.0)
    high_start[0] = 12.0
    assert judge_forgetting(pos, high_start, T).forgets  # nothing after it is above 2 x 3
    rises = high_start.copy()
    rises[pos > 2 * T] = 7.0  # 7 < 2 x 12: the literal reading (first bucket as reference) would pass this
    v = judge_forgetting(pos, rises, T)
    assert not v.forgets and v.blowup_position == 2 * T + 8 and v.max_in_window == 3.0
    high_end = np.full(pos.shape, 3.0)
    high_end[-1] = 50.0  # the last bucket alone
    v = judge_forgetting(pos, high_end, T)
    assert v.forgets and v.evaluated_to == 16 * T


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
    with pytest.raises(ValueError, match="bucket <= seq_len / 2"):
        judge_forgetting(np.array([2 * T]), np.array([3.0]), T)
    with pytest.raises(ValueError, match="bucket <= seq_len / 2"):  # only the first bucket within T_train
        judge_forgetting(np.array([T, 2 * T, 3 * T]), np.full(3, 3.0), T)


def test_from_per_position_losses_with_default_bucket():
    losses = np.full((2, 16 * T), 3.0)
    losses[:, 5 * T:] = 7.0
    v = forgetting_report(losses, T).verdict
    assert v.bucket == 16 and not v.forgets and v.blowup_position == 5 * T + 16


def test_default_bucket_leaves_a_judged_bucket_within_train_length():
    from lightning_mamba.analysis import default_bucket

    assert [default_bucket(t) for t in (4096, 512, 128, 32, 16, 8, 2, 1)] == [512, 64, 16, 16, 8, 4, 1, 1]


@pytest.mark.parametrize("bucket,seq_len,ok", [(1, 2, True), (16, 32, True), (17, 32, False), (0, 32, False),
                                               (32, 32, False), (1, 1, False), (8.0, 32, False), (-4, 32, False)])
def test_bucket_problem_asks_for_a_judged_bucket_within_the_training_length(bucket, seq_len, ok):
    """The first bucket is not judged, so the reference needs a second bucket ending within T_train: 2 x bucket <=
    T_train; and a bucket is a whole number of positions."""
    from lightning_mamba.analysis.criterion import bucket_problem

    problem = bucket_problem(bucket, seq_len)
    assert (problem is None) == ok
    if not ok:
        assert problem.startswith(f"must be a whole number between 1 and half the training length, {seq_len // 2} "
                                  f"(got {bucket})")
        if seq_len >= 2 and type(bucket) is int and 1 <= bucket <= seq_len:
            with pytest.raises(ValueError, match="no bucket but the first ends within"):  # what judge_forgetting says
                judge_forgetting(np.arange(1, 5) * bucket, np.ones(4), seq_len, bucket=bucket)
