"""The one-pass state sampling runs a long row in segments of a bounded size, carrying the state between them."""

import weakref

import numpy as np
import pytest
import torch

from lightning_mamba.analysis import evaluator
from lightning_mamba.analysis.evaluator import (
    iter_pieces,
    iter_state_samples,
    segment_bytes,
    segment_ends,
    segment_strides,
)
from lightning_mamba.analysis.state_stats import state_statistics
from lightning_mamba.models import mixer as mixer_module

from ..op_watch import OpWatch, tensors


def whole_row_one_pass(lm, ids, stride):
    """The unsegmented one pass the segments replace: the whole row in one forward, states kept every ``stride``."""
    records = []
    for m in lm.mixers:
        m.states_every = stride
    try:
        with torch.no_grad():
            lm.hidden_states(ids, record=records)
    finally:
        for m in lm.mixers:
            m.states_every = None
    return records


def test_segments_equal_the_whole_row_in_one_pass(lm):
    ids = torch.randint(0, 64, (2, 70))  # 70: no multiple of the stride, the last sample is short
    stride = 8
    budget = segment_bytes(lm, 2, stride, 2)
    assert segment_strides(lm, 2, stride, 70, budget) == 2
    pieces = list(iter_state_samples(lm, ids, stride, extra_ends=(24,), budget=budget))
    assert all(m.states_every is None for m in lm.mixers)
    # 24 is a sample point inside the segment [16, 32), not one of its ends
    assert segment_ends(70, stride, (24,), 2) == [16, 32, 48, 64, 70]
    assert [p.end for p in pieces] == [8, 16, 24, 32, 40, 48, 56, 64, 70]
    records = whole_row_one_pass(lm, ids, stride)
    for k, p in enumerate(pieces):
        assert p.start == k * stride
        for layer, (s, r) in enumerate(zip(p.state, records)):
            assert s.conv is None
            torch.testing.assert_close(s.ssm, r["states"][:, k], rtol=1e-4, atol=1e-6, msg=f"sample {k}, layer {layer}")
        for a, r in zip(p.record, records):
            torch.testing.assert_close(a["dt"], r["dt"][:, p.start:p.end], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(a["A"], r["A"], rtol=0, atol=0)


def test_extra_ends_off_the_stride_grid_stay_sample_points(lm):
    ids = torch.randint(0, 64, (2, 70))
    extra = (20, 35, 36)  # no multiples of 8; 36 right after 35
    assert segment_ends(70, 8, extra, 3) == [20, 24, 35, 36, 40, 64, 70]
    budget = segment_bytes(lm, 2, 8, 3)
    one = list(iter_state_samples(lm, ids, 8, extra_ends=extra, budget=budget))
    ref = list(iter_pieces(lm, ids, 8, record=True, extra_ends=extra, logits=False))
    assert [(p.start, p.end) for p in one] == [(p.start, p.end) for p in ref]
    assert [p.end for p in one] == [8, 16, 20, 24, 32, 35, 36, 40, 48, 56, 64, 70]
    for a, b in zip(one, ref):
        for sa, sb in zip(a.state, b.state):
            torch.testing.assert_close(sa.ssm, sb.ssm, rtol=1e-4, atol=1e-6)
        for ra, rb in zip(a.record, b.record):
            torch.testing.assert_close(ra["dt"], rb["dt"], rtol=1e-6, atol=1e-7)


def test_segment_size_is_the_largest_within_the_budget(lm, monkeypatch):
    monkeypatch.setattr(evaluator, "SEGMENT_MAX_CHUNKS", 10**6)
    stride = 8
    for k in (1, 3, 10):
        budget = segment_bytes(lm, 4, stride, k)
        assert segment_strides(lm, 4, stride, 10**6, budget) == k
        assert segment_strides(lm, 4, stride, 10**6, budget + 1) == k
        assert segment_strides(lm, 4, stride, 10**6, segment_bytes(lm, 4, stride, k + 1)) == k + 1
    assert segment_strides(lm, 4, stride, 10**6, 1) == 1  # a budget below one stride: one stride a segment
    assert segment_strides(lm, 4, stride, 20, 10**12) == 3  # never more than the row: ceil(20 / 8)
    # more rows or more state per sample: fewer strides a segment
    assert segment_strides(lm, 8, stride, 10**6, segment_bytes(lm, 4, stride, 10)) < 10
    # the scan's chunks per segment are capped whatever the budget (the pass across chunks is quadratic in them)
    monkeypatch.setattr(evaluator, "SEGMENT_MAX_CHUNKS", 12)
    assert segment_strides(lm, 4, stride, 10**6, 10**12) == 12  # stride 8 <= chunk_size 16: one chunk a stride
    assert segment_strides(lm, 4, 64, 10**6, 10**12) == 3  # stride 64 runs in 4 chunks of 16


def test_the_states_held_at_once_stay_within_one_segment(lm, monkeypatch):
    """Each forward covers one segment, and when a segment starts nothing of an earlier one is alive: neither its
    sampled states nor the scan's per-chunk states (the caller, state_statistics, still holds the last piece)."""
    calls = []  # (tokens, weakrefs to the sampled states and to the final state the scan returned)
    real = mixer_module.ssd_sampling_states

    def spy(x, *args, **kwargs):
        earlier = calls[:len(calls) - len(calls) % len(lm.mixers)]  # the calls of the segments before this one
        alive = sum(ref() is not None for _, refs in earlier for ref in refs)
        assert alive == 0, f"{alive} tensors of an earlier segment alive"
        y, final, states = real(x, *args, **kwargs)
        calls.append((x.size(1), [weakref.ref(states), weakref.ref(final)]))
        return y, final, states

    monkeypatch.setattr(mixer_module, "ssd_sampling_states", spy)
    stride, n = 8, 200
    budget = segment_bytes(lm, 2, stride, 4)
    monkeypatch.setattr(evaluator, "STATE_SAMPLES_BUDGET", budget)
    state_statistics(lm, torch.randint(0, 64, (2, n)), seq_len=20, stride=stride)
    lengths = [t for t, _ in calls[::len(lm.mixers)]]  # one call per layer and segment
    assert max(lengths) == 4 * stride and sum(lengths) == n
    assert len(lengths) == len(segment_ends(n, stride, (20,), 4)) > 5


class LiveTensorBytes:
    """The most bytes of tensor storage made inside ``watch()`` that were alive at once."""

    def __init__(self):
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.seen.discard(key)

    def see(self, func, args, out) -> None:
        for t in tensors(out):
            if id(s := t.untyped_storage()) not in self.seen:
                self.seen.add(id(s))
                self.live += s.nbytes()
                weakref.finalize(s, self._free, id(s), s.nbytes())
                self.peak = max(self.peak, self.live)

    def watch(self) -> OpWatch:
        return OpWatch(self.see)


def test_memory_does_not_grow_with_the_length(lm, monkeypatch):
    stride = 8
    budget = segment_bytes(lm, 2, stride, 4)
    monkeypatch.setattr(evaluator, "STATE_SAMPLES_BUDGET", budget)
    peaks = {}
    for n in (128, 1024):
        tokens = torch.randint(0, 64, (2, n))
        mem = LiveTensorBytes()
        with mem.watch():
            state_statistics(lm, tokens, seq_len=16, stride=stride)
        peaks[n] = mem.peak
    # the whole row at once would hold 8x the states at 1024; what grows is only the per-sample (layer, head) stats
    assert peaks[1024] < 1.25 * peaks[128], peaks
    assert peaks[1024] < 1.5 * budget, (peaks, budget)


@pytest.mark.parametrize("seq_len", [24, 20])  # 20: no multiple of the stride
@pytest.mark.parametrize("strides", [None, 2])  # the default budget (one segment here), or segments of 2 strides
def test_state_statistics_of_segments_equal_the_piecewise_run(lm, monkeypatch, seq_len, strides):
    from lightning_mamba.analysis import state_stats as stats_module

    ids = torch.randint(0, 64, (3, 70))
    if strides:
        monkeypatch.setattr(evaluator, "STATE_SAMPLES_BUDGET", segment_bytes(lm, 3, 8, strides))
    fast = state_statistics(lm, ids, seq_len=seq_len, stride=8)
    monkeypatch.setattr(stats_module, "iter_state_samples", lambda model, tokens, stride, dtype, device, extra_ends:
                        iter_pieces(model, tokens, stride, dtype, device, record=True, extra_ends=extra_ends,
                                    logits=False))
    slow = state_statistics(lm, ids, seq_len=seq_len, stride=8)
    assert seq_len in fast.positions.tolist()
    for name in ("positions", "rms", "mean", "var", "outlier_share", "log_retention", "log_retention_T", "mean_alpha",
                 "mean_alpha_in"):
        np.testing.assert_allclose(getattr(fast, name), getattr(slow, name), rtol=1e-4, atol=1e-7, err_msg=name)
