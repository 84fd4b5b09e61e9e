import math

import numpy as np
import pytest
import torch

from lightning_mamba.analysis import head_state_stats, newline_probe, state_statistics
from lightning_mamba.analysis.evaluator import iter_pieces


def set_constant_alpha(lm, dts, As):
    """dt_raw = 0 (zero the dt rows of in_proj), so dt = softplus(dt_bias) = dts[h] and alpha = exp(-dts[h]*As[h])."""
    with torch.no_grad():
        for m in lm.mixers:
            m.in_proj.weight[-m.nheads:] = 0.0
            d = torch.tensor(dts, dtype=torch.float32)
            m.dt_bias.copy_(d + torch.log(-torch.expm1(-d)))
            m.A_log.copy_(torch.log(torch.tensor(As, dtype=torch.float32)))


def test_retention_is_alpha_to_the_t(lm):
    dts, As = [0.01, 0.02, 0.05, 0.001], [1.0, 2.0, 4.0, 0.5]  # log alpha = -dt*A per head
    set_constant_alpha(lm, dts, As)
    log_alpha = -np.array(dts) * np.array(As)
    T, stride = 24, 8
    stats = state_statistics(lm, torch.randint(0, 64, (2, 80)), seq_len=T, stride=stride)
    assert stats.positions.tolist() == [8, 16, 24, 32, 40, 48, 56, 64, 72, 80]
    n_layer, H = 2, 4
    assert stats.rms.shape == (10, n_layer, H) and stats.log_retention.shape == (10, n_layer, H)
    expected = stats.positions[:, None, None] * log_alpha[None, None, :]  # log R_t = t log alpha
    np.testing.assert_allclose(stats.log_retention, np.broadcast_to(expected, (10, n_layer, H)), rtol=1e-5)
    np.testing.assert_allclose(stats.log_retention_T, np.broadcast_to((T - 1) * log_alpha, (n_layer, H)), rtol=1e-5)
    np.testing.assert_allclose(stats.mean_alpha, np.broadcast_to(np.exp(log_alpha), (n_layer, H)), rtol=1e-6)
    np.testing.assert_allclose(stats.mean_alpha_in, stats.mean_alpha, rtol=1e-6)
    s = stats.summary(multiples=(1, 2), retention_threshold=0.99)
    r = np.exp((T - 1) * log_alpha)  # 0.79, 0.40, 0.01, 0.9885: no head above 0.99
    assert s["frac_heads_above_0.99"] == 0.0 and s["max_first_token"] == pytest.approx(r.max(), rel=1e-5)
    assert s["max_first_token_at"] == [0, 3]
    assert s["min_mean_alpha"] == pytest.approx(math.exp(-0.2), rel=1e-6)


def test_frac_heads_above_threshold_picks_the_head_that_never_forgets(lm):
    set_constant_alpha(lm, [0.01, 0.02, 0.05, 1e-4], [1.0, 2.0, 4.0, 1.0])
    with torch.no_grad():  # layer 1 forgets everywhere
        lm.mixers[1].A_log.fill_(math.log(8.0))
    s = state_statistics(lm, torch.randint(0, 64, (1, 64)), seq_len=32, stride=16).summary()
    assert s["frac_heads_above_0.99"] == pytest.approx(1 / 8)  # one head of 2 layers x 4 heads
    assert s["max_first_token_at"] == [0, 3] and s["max_first_token"] == pytest.approx(math.exp(-31e-4), rel=1e-5)


def test_state_samples_are_the_carried_states(lm):
    tokens = torch.randint(0, 64, (2, 48))
    stats = state_statistics(lm, tokens, seq_len=16, stride=16)
    with torch.no_grad():
        _, state = lm(tokens[:, :32])
    ssm = torch.stack([s.ssm for s in state], 1).double()  # (b, L, H, P, N)
    rms = ssm.pow(2).mean((-2, -1)).sqrt().mean(0)
    np.testing.assert_allclose(stats.rms[1], rms.numpy(), rtol=1e-4)
    var = ssm.flatten(-2).var(-1, unbiased=False).mean(0)
    np.testing.assert_allclose(stats.var[1], var.numpy(), rtol=1e-4)
    s = stats.summary(multiples=(1, 2))
    assert {"norm_max@1x", "norm_max@2x", "norm_growth", "var_growth", "outlier_share"} <= s.keys()
    assert s["norm_max@1x"] == pytest.approx(stats.rms[0].max())


def test_head_state_stats_by_hand():
    P, N = 16, 16
    n = P * N
    s = torch.zeros(1, 2, P, N)
    s[0, 0, 3, 5] = 10.0  # one outlier entry in head 0
    s[0, 1] = 2.0  # head 1: constant, no variance
    st = head_state_stats(s, top_fraction=1 / n)  # top 1 entry
    assert st["outlier_share"][0, 0].item() == pytest.approx((n - 1) / n)
    assert st["outlier_share"][0, 1].item() == 0.0
    assert st["rms"][0, 0].item() == pytest.approx(10 / math.sqrt(n))
    assert st["mean"][0, 1].item() == pytest.approx(2.0) and st["rms"][0, 1].item() == pytest.approx(2.0)
    assert st["var"][0, 0].item() == pytest.approx(100 * (n - 1) / n**2)
    k = math.ceil(0.01 * n)  # default: top 1% = 3 entries
    assert head_state_stats(s)["outlier_share"][0, 0].item() == pytest.approx(((n - 1) ** 2 + k - 1) / (n * (n - 1)))


def test_newline_probe():
    class Byte:
        def encode(self, text):
            return list(text.encode())

    class Merging:
        def encode(self, text):
            return [1, 2]

    assert newline_probe(Byte(), 5).tolist() == [[10] * 5]
    with pytest.raises(ValueError, match="one token"):
        newline_probe(Merging(), 5)


def test_iter_pieces_rejects_bad_piece_len(lm):
    with pytest.raises(ValueError, match="piece_len"):
        next(iter_pieces(lm, torch.zeros(1, 4, dtype=torch.long), 0))


def test_state_at_train_length_is_always_sampled(lm):
    stats = state_statistics(lm, torch.randint(0, 64, (1, 100)), seq_len=24, stride=40)
    assert stats.positions.tolist() == [24, 40, 80, 100]
    s = stats.summary(multiples=(1, 4))
    assert "norm_max@1x" in s and "norm_growth" in s and "norm_max@4x" in s


def test_rows_in_batches_give_the_same_statistics(lm):
    tokens = torch.randint(0, 64, (3, 60))
    a = state_statistics(lm, tokens, seq_len=20, stride=16)
    b = state_statistics(lm, tokens, seq_len=20, stride=16, batch_size=2)
    for k in ("rms", "var", "outlier_share", "log_retention", "log_retention_T", "mean_alpha", "mean_alpha_in"):
        np.testing.assert_allclose(getattr(b, k), getattr(a, k), rtol=1e-5, atol=1e-9)


def test_iter_pieces_without_logits_carries_the_same_states(lm):
    ids = torch.randint(0, 64, (2, 30))
    with_logits = list(iter_pieces(lm, ids, 8, record=True, extra_ends=(12,)))
    states_only = list(iter_pieces(lm, ids, 8, record=True, extra_ends=(12,), logits=False))
    assert [(p.start, p.end) for p in states_only] == [(0, 8), (8, 12), (12, 16), (16, 24), (24, 30)]
    for a, b in zip(with_logits, states_only):
        assert a.logits.shape[:2] == (2, a.end - a.start) and b.logits is None
        for sa, sb in zip(a.state, b.state):
            torch.testing.assert_close(sb.ssm, sa.ssm, rtol=0, atol=0)
        torch.testing.assert_close(b.record[0]["dt"], a.record[0]["dt"], rtol=0, atol=0)


def test_one_pass_state_samples_equal_the_piecewise_run(lm, monkeypatch):
    from lightning_mamba.analysis import evaluator, state_stats as stats_module

    ids = torch.randint(0, 64, (2, 70))  # 70: the last piece is short
    one = list(evaluator.iter_state_samples(lm, ids, 8, extra_ends=(24,)))
    ref = list(iter_pieces(lm, ids, 8, record=True, extra_ends=(24,), logits=False))
    assert [(p.start, p.end) for p in one] == [(p.start, p.end) for p in ref] and len(one) == 9
    for a, b in zip(one, ref):
        for sa, sb in zip(a.state, b.state):
            assert sa.conv is None
            torch.testing.assert_close(sa.ssm, sb.ssm, rtol=1e-4, atol=1e-6)
        for ra, rb in zip(a.record, b.record):
            torch.testing.assert_close(ra["dt"], rb["dt"], rtol=1e-6, atol=1e-7)
    assert all(m.states_every is None for m in lm.mixers)  # the request is withdrawn after the pass

    fast = state_statistics(lm, ids, seq_len=24, stride=8)
    monkeypatch.setattr(stats_module, "iter_state_samples", lambda model, tokens, stride, dtype, device, extra_ends:
                        iter_pieces(model, tokens, stride, dtype, device, record=True, extra_ends=extra_ends,
                                    logits=False))
    slow = state_statistics(lm, ids, seq_len=24, stride=8)
    for name in ("positions", "rms", "var", "outlier_share", "log_retention", "log_retention_T", "mean_alpha"):
        np.testing.assert_allclose(getattr(fast, name), getattr(slow, name), rtol=1e-4, atol=1e-7, err_msg=name)


def test_state_samples_fall_back_to_pieces_when_a_mixer_rewrites_its_state(lm):
    from lightning_mamba.analysis.evaluator import iter_state_samples

    ids = torch.randint(0, 64, (1, 40))
    halve = lambda mixer, state: state._replace(ssm=state.ssm * 0.5)  # noqa: E731
    for m in lm.mixers:
        m.state_hook = halve
    try:
        hooked = list(iter_state_samples(lm, ids, 8))
        ref = list(iter_pieces(lm, ids, 8, record=True, logits=False))
    finally:
        for m in lm.mixers:
            m.state_hook = None
    assert hooked[0].state[0].conv is not None  # the piecewise run: the hook acted at every piece boundary
    for a, b in zip(hooked, ref):
        torch.testing.assert_close(a.state[0].ssm, b.state[0].ssm, rtol=0, atol=0)
    assert list(iter_state_samples(lm, ids, 8, extra_ends=(12,)))[1].end == 12  # off the stride grid: a sample too


def test_one_pass_with_a_stride_above_the_chunk_size(lm):
    from lightning_mamba.analysis.evaluator import iter_state_samples

    assert all(m.chunk_size < 24 for m in lm.mixers)  # 24 = 3 x 8: the scan runs in chunks of <= chunk_size
    ids = torch.randint(0, 64, (1, 100))
    one = list(iter_state_samples(lm, ids, 24))
    ref = list(iter_pieces(lm, ids, 24, record=True, logits=False))
    assert [p.end for p in one] == [p.end for p in ref] == [24, 48, 72, 96, 100]
    for a, b in zip(one, ref):
        torch.testing.assert_close(a.state[-1].ssm, b.state[-1].ssm, rtol=1e-4, atol=1e-6)


def test_growth_past_t_ignores_nearly_silent_heads_but_catches_a_real_explosion():
    from lightning_mamba.analysis.state_stats import StateStats

    positions = np.array([8, 16, 32, 64, 128])  # T = 16: two samples within, three beyond
    var = np.ones((5, 1, 3))
    var[:, 0, 1] = [1e-9, 1e-9, 1e-6, 1e-6, 1e-6]  # a silent head: x1000 of almost nothing
    var[:, 0, 2] = [1.0, 1.0, 3.0, 30.0, 40.0]  # a head whose state explodes past T (claim 5: >= 10x)
    zeros = np.zeros_like(var)
    stats = StateStats("text", 16, positions, np.sqrt(var), zeros, var, zeros, zeros, None, np.zeros((1, 3)),
                       np.zeros((1, 3)))
    s = stats.summary(multiples=(1,))
    assert s["var_growth"] == pytest.approx(40.0) and s["var_growth_at"] == [0, 2]
    var[:, 0, 2] = 1.0  # without the explosion, the silent head alone does not read as growth
    assert stats.summary(multiples=(1,))["var_growth"] == pytest.approx(1.0)
