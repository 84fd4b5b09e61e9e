"""Passkey scoring: the teacher-forced scorer equals real greedy generation; grids, T_recall, figures."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from lightning_mamba.analysis.passkey import (
    PasskeyGrid,
    evaluate_passkey,
    greedy_generate,
    plot_passkey_curve,
    plot_passkey_heatmap,
    score_samples,
    t_recall,
)
from lightning_mamba.data.passkey import PasskeyGenerator, default_depths, grid_samples
from lightning_mamba.data.tokenization import ByteTokenizer
from tests.tiny import tiny_lm


def first_mismatch(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


def test_teacher_forced_scorer_equals_step_by_step_greedy_decoding():
    model = tiny_lm(vocab_size=257, seed=1)
    gen = PasskeyGenerator(ByteTokenizer())
    samples = []
    for length in (gen.min_length, 300, 700):
        for s in grid_samples(gen, length, 0.5, 2, seed=length):
            n = len(s.answer_ids)
            greedy = greedy_generate(model, torch.from_numpy(s.input_ids)[None], n, piece_len=64)[0]
            altered_last, altered_mid = greedy.clone(), greedy.clone()
            altered_last[-1] = (altered_last[-1] + 1) % 256
            altered_mid[2] = (altered_mid[2] + 7) % 256
            for answer in (s.answer_ids, greedy.numpy(), altered_last.numpy(), altered_mid.numpy()):
                samples.append((dataclasses.replace(s, answer_ids=np.asarray(answer, dtype=np.int64)), greedy.tolist()))
    # several pieces per prompt, carried state; and one piece for the whole prompt: the same predictions
    scores = score_samples(model, [s for s, _ in samples], piece_len=64, batch_size=3)
    whole = score_samples(model, [s for s, _ in samples], piece_len=4096, batch_size=8)
    n_correct = 0
    for (s, greedy), sc, sc_whole in zip(samples, scores, whole):
        answer = s.answer_ids.tolist()
        assert sc.correct == (greedy == answer)  # exact match <=> greedy decoding produces the answer
        k = first_mismatch(greedy, answer)
        assert sc.predicted[:k + 1] == greedy[:k + 1]  # identical up to and including greedy's first mistake
        assert sc.predicted == sc_whole.predicted
        n_correct += sc.correct
    assert n_correct == len(samples) // 4  # the greedy answers, and only they


class InductionLM(nn.Module):
    """A fake LM with real carried state: predicts the byte that followed the last earlier occurrence of the
    current 12-byte context (a perfect copier, so it finds passkeys), but only up to position ``reach``."""

    def __init__(self, reach: int, context: int = 12):
        super().__init__()
        self.reach, self.context = reach, context
        self.config = type("Config", (), {"vocab_size": 257})()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, state=None, record=None):
        logits, states = [], []
        for r in range(input_ids.size(0)):
            prev = None if state is None else state[r]
            table, recent, pos = prev if prev is not None else ({}, (), 0)
            table, preds = dict(table), []
            for t in input_ids[r].tolist():
                new_recent = (recent + (t,))[-self.context:]
                if len(recent) == self.context:
                    table[recent] = t  # context `recent` was followed by t
                recent, pos = new_recent, pos + 1
                preds.append(table.get(recent, 0) if pos <= self.reach else 0)
            logits.append(nn.functional.one_hot(torch.tensor(preds), 264).float())
            states.append((table, recent, pos))
        return torch.stack(logits) + 0 * self.dummy, states

    def step(self, input_ids, state):
        logits, state = self.forward(input_ids[:, None], state)
        return logits[:, 0], state


def test_grid_accuracy_and_t_recall_on_a_copier_with_limited_reach():
    gen = PasskeyGenerator(ByteTokenizer())
    model = InductionLM(reach=650)
    for s in grid_samples(gen, 400, 0.3, 2):  # it really solves passkeys, step by step
        greedy = greedy_generate(model, torch.from_numpy(s.input_ids)[None], len(s.answer_ids), piece_len=100)
        assert ByteTokenizer().decode(greedy[0].tolist()) == " " + s.key
    grid = evaluate_passkey(model, gen, [300, 500, 640, 800, 1200], default_depths(3), 2, piece_len=256)
    assert grid.correct.shape == (3, 5, 2) and grid.accuracy.shape == (3, 5)
    np.testing.assert_array_equal(grid.accuracy_by_length, [1, 1, 1, 0, 0])
    assert grid.t_recall() == 640  # a 640-token prompt's answer is predicted up to position 645 <= reach
    d = json.loads(json.dumps(grid.to_dict()))
    assert d["t_recall"] == 640 and np.array(d["correct"]).shape == (3, 5, 2) and len(d["keys"][0][0]) == 2


class ForgettingCopier(InductionLM):
    """An induction copier that only remembers what it saw in the last ``window`` tokens: it forgets."""

    def __init__(self, window: int, context: int = 12):
        super().__init__(reach=10**9, context=context)
        self.window = window

    def forward(self, input_ids, state=None, record=None):
        logits, states = [], []
        for r in range(input_ids.size(0)):
            table, recent, pos = state[r] if state is not None else ({}, (), 0)
            table, preds = dict(table), []
            for t in input_ids[r].tolist():
                if len(recent) == self.context:
                    table[recent] = (t, pos)  # context `recent` was followed by t, at position pos
                recent, pos = (recent + (t,))[-self.context:], pos + 1
                seen = table.get(recent)
                preds.append(seen[0] if seen is not None and pos - seen[1] <= self.window else 0)
            logits.append(nn.functional.one_hot(torch.tensor(preds), 264).float())
            states.append((table, recent, pos))
        return torch.stack(logits) + 0 * self.dummy, states


def test_accuracy_by_needle_distance_shows_forgetting():
    gen = PasskeyGenerator(ByteTokenizer())
    grid = evaluate_passkey(ForgettingCopier(window=400), gen, [300, 600, 1200], default_depths(4), 2, piece_len=256)
    by_distance = grid.accuracy_by_distance(seq_len=300)
    # nominal distances (1 - depth) x length / 300: 0.12-0.88 (length 300), 0.25-1.75 (600), 0.5-3.5 (1200)
    assert list(by_distance) == ["0-1x", "1-2x", "2-4x"]
    assert by_distance["0-1x"] == (1.0, 14)  # near needles are found at every length, 7 cells x 2 keys
    assert by_distance["2-4x"] == (0.0, 4)  # needles 750 and 1050 tokens back are forgotten
    assert by_distance["1-2x"][0] < 1.0
    assert grid.accuracy_by_length[0] == 1.0 and grid.accuracy_by_length[-1] < 1.0  # by length alone: no reason
    d = json.loads(json.dumps(grid.to_dict(seq_len=300)))
    assert d["accuracy_by_distance"]["0-1x"] == {"accuracy": 1.0, "prompts": 14}
    assert "accuracy_by_distance" not in grid.to_dict()  # unknown training length: no buckets


def test_accuracy_by_distance_buckets():
    correct = np.array([[[1, 1], [1, 0], [0, 0]],   # depth 0.0: distances 1, 2, 4 x 100 tokens
                        [[1, 1], [1, 1], [1, 1]]])  # depth 0.9: distances 0.1, 0.2, 0.4
    grid = PasskeyGrid([100, 200, 400], [0.0, 0.9], correct.astype(bool), np.zeros(correct.shape))
    got = grid.accuracy_by_distance(100)
    assert got["0-1x"] == (1.0, 8) and got["1-2x"] == (0.5, 2) and got["2-4x"] == (0.0, 2) and len(got) == 3
    assert grid.accuracy_by_distance(100, edges=(3,)) == {"0-3x": (0.9, 10), "3x+": (0.0, 2)}


def test_t_recall_rule():
    lengths = [1024, 2048, 4096, 8192]
    assert t_recall(lengths, [1.0, 0.96, 0.5, 0.0]) == 2048
    assert t_recall(lengths, [1.0, 0.95, 0.5, 0.0]) == 1024  # strictly above 95%
    assert t_recall(lengths, [0.9, 0.5, 0.1, 0.0]) is None
    assert t_recall(lengths, [1.0, 0.2, 1.0, 0.0]) == 4096  # the longest passing length, as the paper defines it


def test_figures_and_grid_on_a_tiny_mamba():
    model = tiny_lm(vocab_size=257)
    gen = PasskeyGenerator(ByteTokenizer())
    grid = evaluate_passkey(model, gen, [200, 256, 512], default_depths(2), 2, piece_len=128)
    assert isinstance(grid, PasskeyGrid) and grid.token_acc.shape == (2, 3, 2)
    assert ((0 <= grid.token_acc) & (grid.token_acc <= 1)).all()
    heat, curve = plot_passkey_heatmap(grid, seq_len=256), plot_passkey_curve(grid, seq_len=256)
    assert heat.axes and curve.axes
    with pytest.raises(ValueError, match="depth"):
        evaluate_passkey(model, gen, [200], [2.0], 1)


def test_a_64k_token_prompt_runs_in_pieces():
    model = tiny_lm(vocab_size=257)
    sample = grid_samples(PasskeyGenerator(ByteTokenizer()), 65536, 0.5, 1)[0]
    a = score_samples(model, [sample], piece_len=4096)[0]
    b = score_samples(model, [sample], piece_len=16384)[0]
    assert a.predicted == b.predicted and len(a.predicted) == 6


def test_accuracy_by_distance_counts_needles_at_depth_one():
    # depth 1.0 (a documented depth: the needle right before the question) is distance 0: in the first bucket, so
    # that the buckets hold every prompt of the grid (they left these out)
    correct = np.array([[[1, 0]], [[1, 1]]])  # depths 0.5 and 1.0 at length 100
    grid = PasskeyGrid([100], [0.5, 1.0], correct.astype(bool), np.zeros(correct.shape))
    assert grid.accuracy_by_distance(100) == {"0-1x": (0.75, 4)}
