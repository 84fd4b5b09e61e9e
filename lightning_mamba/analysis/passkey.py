"""Passkey retrieval scoring: exact match of the greedily decoded answer, over a lengths x depths grid.

Greedy decoding of the answer is right iff, at every answer position, the argmax given the *true* previous
answer tokens is the true token (by induction: while it is right, greedy's prefix is the true prefix). So
one teacher-forced forward over prompt + answer scores it exactly: :func:`score_samples`. It runs in
pieces with the state carried (:func:`~lightning_mamba.analysis.evaluator.iter_pieces`), so memory does not
grow with the prompt (64K-1M tokens work); ``predicted`` equals greedy decoding's tokens up to and including
its first mistake. :func:`greedy_generate` is the step-by-step reference the tests compare it with.

The answer is the key's tokens as the tokenizer encodes them after the question (see
``lightning_mamba.data.passkey``); a sample is correct when all of them are predicted. Argmax is over the
model's real vocabulary (``config.vocab_size``), not the padding rows, as the official generation does.

T_recall (paper): the longest length whose accuracy over all depths and samples is > 95%.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.passkey import PasskeyGenerator, PasskeySample, passkey_grid
from .evaluator import iter_pieces, precision_context
from .plots import plt, text_color_on


@dataclass
class SampleScore:
    correct: bool
    token_acc: float  # share of answer tokens predicted right (teacher-forced)
    predicted: list[int]  # teacher-forced argmax at each answer position
    answer: list[int]


def _vocab(model) -> int:
    return int(getattr(getattr(model, "config", None), "vocab_size", 0)) or None


def score_samples(model: torch.nn.Module, samples: list[PasskeySample], piece_len: int = 2048,
                  dtype: str | torch.dtype = torch.float32, device=None, batch_size: int = 8) -> list[SampleScore]:
    """Score each sample with one teacher-forced forward over prompt + answer[:-1] (see the module docstring).

    Samples with prompts of equal length go through the model together, ``batch_size`` at a time; answers of
    different lengths are right-padded (padding comes after the scored positions, so it changes nothing)."""
    vocab = _vocab(model)
    scores: list[SampleScore | None] = [None] * len(samples)
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.length, []).append(i)
    for length, idx in groups.items():
        for b in range(0, len(idx), batch_size):
            batch = [samples[i] for i in idx[b:b + batch_size]]
            n_ans = max(len(s.answer_ids) for s in batch)
            rows = torch.zeros(len(batch), length + n_ans, dtype=torch.long)
            for r, s in enumerate(batch):
                rows[r, :length] = torch.from_numpy(s.input_ids)
                rows[r, length:length + len(s.answer_ids)] = torch.from_numpy(s.answer_ids)
            # logits at input index j predict token j + 1: the answer is predicted at length-1 .. length+n_ans-2
            preds = torch.empty(len(batch), n_ans, dtype=torch.long)
            for p in iter_pieces(model, rows[:, :-1], piece_len, dtype, device, extra_ends=(length - 1,)):
                lo, hi = max(p.start, length - 1), p.end
                if lo < hi:
                    logits = p.logits[:, lo - p.start:hi - p.start]
                    preds[:, lo - (length - 1):hi - (length - 1)] = logits[..., :vocab].argmax(-1).cpu()
            for r, s in enumerate(batch):
                pred = preds[r, :len(s.answer_ids)].tolist()
                hits = [a == b for a, b in zip(pred, s.answer_ids.tolist())]
                scores[idx[b + r]] = SampleScore(all(hits), sum(hits) / len(hits), pred, s.answer_ids.tolist())
    return scores


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompt: torch.Tensor, n_tokens: int, piece_len: int = 2048,
                    dtype: str | torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Real greedy decoding: the prompt (b, L) in pieces, then ``model.step`` one token at a time -> (b, n_tokens)."""
    vocab = _vocab(model)
    *_, last = iter_pieces(model, prompt, piece_len, dtype, device)
    token = last.logits[:, -1, :vocab].argmax(-1)
    state, out = last.state, [token]
    with precision_context(token.device, dtype):
        for _ in range(n_tokens - 1):
            logits, state = model.step(token, state)
            token = logits[:, :vocab].argmax(-1)
            out.append(token)
    return torch.stack(out, 1).cpu()


# ---- the grid --------------------------------------------------------------------------------------------
def recall_threshold_problem(threshold: float) -> str | None:
    """Why ``threshold`` cannot be T_recall's (None when it can): a length counts when its accuracy exceeds it, so it
    must lie in [0, 1)."""
    if isinstance(threshold, (int, float)) and 0 <= threshold < 1:  # (NaN fails too)
        return None
    return (f"must be in [0, 1) (got {threshold}): T_recall is the longest length with accuracy > threshold, and no "
            f"accuracy exceeds 1 (the paper's is 0.95)")


def t_recall(lengths: Iterable[int], accuracy: Iterable[float], threshold: float = 0.95) -> int | None:
    """The paper's T_recall: the longest length whose accuracy is > ``threshold`` (None if none is)."""
    passing = [int(n) for n, a in zip(lengths, accuracy) if a > threshold]
    return max(passing) if passing else None


DISTANCE_EDGES = (1, 2, 4, 8)  # needle-to-question distance buckets, in units of the training length


def distance_label(lo: float, hi: float | None) -> str:
    return f"{lo:g}-{hi:g}x" if hi is not None else f"{lo:g}x+"


def distance_buckets(depths, lengths, seq_len: int, edges=DISTANCE_EDGES) -> dict[str, np.ndarray]:
    """{bucket: (depths, lengths) mask} by how far the needle sits before the question, (1 - depth) x length, in
    units of ``seq_len``: buckets 0-1x, 1-2x, ... and the last edge upwards; empty buckets are left out. The first
    bucket holds distance 0 too (depth 1: the needle right before the question)."""
    distance = np.outer(1.0 - np.asarray(depths), np.asarray(lengths)) / seq_len  # (depths, lengths)
    bounds = [0.0, *edges, None]
    out = {}
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        above = distance >= lo if lo == 0 else distance > lo
        cells = above & (distance <= hi if hi is not None else True)
        if cells.any():
            out[distance_label(lo, hi)] = cells
    return out


@dataclass
class PasskeyGrid:
    """Results of a lengths x depths grid; arrays are (depths, lengths, samples)."""

    lengths: list[int]
    depths: list[float]
    correct: np.ndarray
    token_acc: np.ndarray
    keys: list = field(default_factory=list)  # [depth][length] -> keys of the cell
    seconds: float = 0.0

    @property
    def accuracy(self) -> np.ndarray:
        """(depths, lengths): share of exact matches per cell."""
        return self.correct.mean(-1)

    @property
    def accuracy_by_length(self) -> np.ndarray:
        """(lengths,): over all depths and samples at that length."""
        return self.correct.mean((0, 2))

    def t_recall(self, threshold: float = 0.95) -> int | None:
        return t_recall(self.lengths, self.accuracy_by_length, threshold)

    def accuracy_by_distance(self, seq_len: int, edges=DISTANCE_EDGES) -> dict[str, tuple[float, int]]:
        """{bucket: (accuracy, prompts)} over the :func:`distance_buckets` of the grid. Forgetting shows here
        directly: near needles are found at every prompt length, far ones are lost."""
        out = {}
        for label, cells in distance_buckets(self.depths, self.lengths, seq_len, edges).items():
            hits = self.correct[cells]  # (cells, samples)
            out[label] = (float(hits.mean()), int(hits.size))
        return out

    def to_dict(self, threshold: float = 0.95, seq_len: int | None = None) -> dict:
        by_distance = {} if not seq_len else {
            "accuracy_by_distance": {k: {"accuracy": a, "prompts": n} for k, (a, n) in self.accuracy_by_distance(seq_len).items()}}
        return {**by_distance, "lengths": self.lengths, "depths": self.depths, "samples_per_cell": int(self.correct.shape[-1]),
                "accuracy": self.accuracy.tolist(), "accuracy_by_length": self.accuracy_by_length.tolist(),
                "token_accuracy": self.token_acc.mean(-1).tolist(), "t_recall": self.t_recall(threshold),
                "t_recall_threshold": threshold, "correct": self.correct.astype(int).tolist(), "keys": self.keys,
                "seconds": self.seconds}


def evaluate_passkey(model: torch.nn.Module, generator: PasskeyGenerator, lengths, depths, n_per_cell: int = 4,
                     seed: int = 0, piece_len: int = 2048, dtype: str | torch.dtype = torch.float32, device=None,
                     batch_size: int = 8) -> PasskeyGrid:
    """Score ``n_per_cell`` samples in each (length, depth) cell; samples are built one cell at a time."""
    t0 = time.perf_counter()
    lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]
    correct = np.zeros((len(depths), len(lengths), n_per_cell), dtype=bool)
    token_acc = np.zeros(correct.shape)
    keys = [[None] * len(lengths) for _ in depths]
    for li, di, samples in passkey_grid(generator, lengths, depths, n_per_cell, seed):
        scores = score_samples(model, samples, piece_len, dtype, device, batch_size)
        correct[di, li] = [s.correct for s in scores]
        token_acc[di, li] = [s.token_acc for s in scores]
        keys[di][li] = [s.key for s in samples]
    return PasskeyGrid(lengths, depths, correct, token_acc, keys, time.perf_counter() - t0)


# ---- figures ---------------------------------------------------------------------------------------------
def _tokens(n: float) -> str:
    for div, unit in ((2**20, "M"), (2**10, "K")):
        if n >= div and n % (div // 16) == 0:
            return f"{n / div:g}{unit}"
    return f"{int(n)}"


ACCURACY_CMAP = "YlGn"  # 0: pale yellow (failed), 1: dark green (retrieved)


def _accuracy_text(a: float) -> str:
    return "0" if a == 0 else "1" if a == 1 else f"{a:.2f}"


def draw_accuracy_heatmap(ax, accuracy, lengths, depths, seq_len: int | None = None, annotate_max_cells: int = 120,
                          fontsize: float = 8):
    """Depth (rows) x length (columns) accuracy on a fixed 0-1 colour scale, tick labels 1K/2K/..., each cell's
    value written in it when there are at most ``annotate_max_cells``, a dashed line right of T_train's column.
    Returns the image (for a colour bar)."""
    acc = np.asarray(accuracy, dtype=float)
    norm = plt.Normalize(0.0, 1.0)
    cmap = plt.get_cmap(ACCURACY_CMAP)
    im = ax.imshow(acc, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    labels = [_tokens(n) for n in lengths]
    rotate = 45 if len(lengths) > 8 or max(map(len, labels)) > 5 else 0
    ax.set_xticks(range(len(lengths)), labels, rotation=rotate, fontsize=fontsize, ha="right" if rotate else "center")
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=fontsize)
    if seq_len in list(lengths):
        ax.axvline(list(lengths).index(seq_len) + 0.5, color="C3", linestyle="--", linewidth=1.5)
    if acc.size <= annotate_max_cells:
        for (r, c), a in np.ndenumerate(acc):
            ax.text(c, r, _accuracy_text(a), ha="center", va="center", fontsize=fontsize,
                    color=text_color_on(cmap(norm(a))))
    return im


def plot_passkey_heatmap(grid: PasskeyGrid, seq_len: int | None = None, title: str = ""):
    """Accuracy per cell, depth (rows) x length (columns), values written in the cells; T_train's column is marked."""
    n_len, n_depth = len(grid.lengths), len(grid.depths)
    fig, ax = plt.subplots(figsize=(max(4.8, 0.7 * n_len + 2.6), max(3.2, 0.42 * n_depth + 2.0)))
    im = draw_accuracy_heatmap(ax, grid.accuracy, grid.lengths, grid.depths, seq_len)
    marked = seq_len in grid.lengths
    ax.set_xlabel("prompt length (tokens)" + (f"; red dashes: after T_train = {_tokens(seq_len)}" if marked else
                                              f"; T_train = {_tokens(seq_len)}" if seq_len else ""), fontsize=9)
    ax.set_ylabel("needle depth (0 = start)", fontsize=9)
    samples = int(grid.correct.shape[-1])
    ax.set_title(title or f"passkey accuracy ({samples} prompt{'s' if samples != 1 else ''} per cell)", fontsize=10)
    bar = fig.colorbar(im, ax=ax)
    bar.set_label("exact-match accuracy", fontsize=9)
    fig.tight_layout()
    return fig


def plot_passkey_curve(grid: PasskeyGrid, seq_len: int | None = None, threshold: float = 0.95, title: str = ""):
    """Accuracy over all depths vs length (log x), with T_train and the T_recall threshold marked."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(grid.lengths, grid.accuracy_by_length, marker="o", linewidth=1.2, label="exact match")
    ax.plot(grid.lengths, grid.token_acc.mean((0, 2)), marker=".", linewidth=1, linestyle=":",
            label="answer tokens right")
    if seq_len:
        ax.axvline(seq_len, color="k", linestyle="--", linewidth=1, label=f"T_train = {seq_len}")
    ax.axhline(threshold, color="r", linestyle=":", linewidth=1, label=f"{threshold:.0%} (T_recall)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(grid.lengths, [_tokens(n) for n in grid.lengths], fontsize=8)
    ax.minorticks_off()
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("accuracy")
    t = grid.t_recall(threshold)
    ax.set_title(title or f"passkey accuracy vs length (T_recall = {t if t is not None else 'none'})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
