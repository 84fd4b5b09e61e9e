"""Passkey retrieval during training: accuracy within and beyond the training length (paper claims 11-12)."""

from __future__ import annotations

import math
import os
import time
from functools import partial
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from ..analysis.passkey import evaluate_passkey, plot_passkey_curve, plot_passkey_heatmap, recall_threshold_problem
from ..atomic import atomic_write_json
from ..data.passkey import PasskeyGenerator, default_depths
from ..training.run_checks import SettingError
from .length_generalization import PeriodicAnalysis, check_dtype


class PasskeyEvalCallback(PeriodicAnalysis):
    """Passkey accuracy on a grid of prompt lengths (multiples of T_train) x needle depths.

    Args:
        every_n_validations: Run after every N-th validation (and at the end of fit).
        multiples: Prompt lengths in units of T_train (``data.seq_len``). Lengths shorter than the template
            (with the run's tokenizer) are skipped with a warning.
        n_depths: Depths (i + 0.5) / n_depths, evenly spaced as in the paper.
        n_samples: Prompts per (length, depth) cell (keys drawn from ``seed``; the same ones every run).
        threshold: T_recall is the longest length with accuracy > threshold (the paper: 0.95).
        piece_len: Tokens per forward; the state is carried between pieces (default 2048 on GPU, 512 on CPU).
        batch_size: Prompts per forward.
        dtype: float32 (the paper's analysis precision), tf32 (float32 with TF32 matmuls on a GPU) or bfloat16.
        seed: Seed of the keys.
        figures_every_n_runs: Draw the figures at the first run, every N-th, and at the end of fit (scalars and
            JSON every run).

    The prompts come from the data module's ``passkey_generator`` when it has one (its template), else the
    paper's template with the data module's tokenizer. Logs ``passkey/acc@{m}x`` per multiple,
    ``passkey/t_recall`` (tokens; 0 when no length passes), the figures ``passkey/accuracy_heatmap``
    (depth x length) and ``passkey/accuracy_vs_length``, and ``<log_dir>/passkey/step_<step>.json``.
    """

    name = "passkey"

    def __init__(
        self,
        every_n_validations: int = 1,
        multiples: tuple[float, ...] | list[float] = (0.5, 1, 2, 4, 8),
        n_depths: int = 5,
        n_samples: int = 4,
        threshold: float = 0.95,
        piece_len: int | None = None,
        batch_size: int = 8,
        dtype: str = "float32",
        seed: int = 0,
        figures_every_n_runs: int = 1,
    ):
        super().__init__(every_n_validations, figures_every_n_runs)
        check_dtype(type(self).__name__, dtype)
        if not multiples or not all(math.isfinite(m) and m > 0 for m in multiples):  # (inf failed after training)
            raise SettingError(f"{type(self).__name__}: multiples must be positive finite numbers (got {multiples})")
        if n_samples < 1 or n_depths < 1:
            raise SettingError(f"{type(self).__name__}: n_samples and n_depths must be >= 1 "
                               f"(got {n_samples}, {n_depths})")
        if problem := recall_threshold_problem(threshold):
            raise SettingError(f"{type(self).__name__}: threshold {problem}")
        self.multiples = tuple(sorted(float(m) for m in multiples))
        self.depths = default_depths(n_depths)
        self.n_samples, self.threshold, self.piece_len = n_samples, threshold, piece_len
        self.batch_size, self.dtype, self.seed = batch_size, dtype, seed
        self._warned = False

    @staticmethod
    def tag(m: float) -> str:
        return f"passkey/acc@{m:g}x"

    def generator(self, data: Any) -> PasskeyGenerator:
        gen = getattr(data, "passkey_generator", None)
        return gen if isinstance(gen, PasskeyGenerator) else PasskeyGenerator(data.tokenizer)

    def analyze(self, trainer: L.Trainer, model, data: Any, step: int) -> None:
        t0 = time.perf_counter()
        T = int(data.hparams.seq_len)
        gen = self.generator(data)
        lengths = {m: int(round(m * T)) for m in self.multiples}
        usable = {m: n for m, n in lengths.items() if n >= gen.min_length}
        if len(usable) < len(lengths) and not self._warned:
            self._warned = True
            rank_zero_warn(f"passkey: lengths {sorted(set(lengths.values()) - set(usable.values()))} are shorter than "
                           f"the template ({gen.min_length} tokens with this tokenizer) and are skipped")
        if not usable:
            return
        device = next(model.parameters()).device
        piece_len = self.piece_len or self.default_piece_len(model)
        order = sorted(set(usable.values()))
        grid = evaluate_passkey(model, gen, order, self.depths, self.n_samples, self.seed, piece_len, self.dtype,
                                device, self.batch_size)
        by_length = dict(zip(order, grid.accuracy_by_length.tolist()))
        t_recall = grid.t_recall(self.threshold)
        metrics = {self.tag(m): by_length[n] for m, n in usable.items()}
        metrics["passkey/t_recall"] = float(t_recall or 0)
        metrics.update({f"passkey/by_distance/{k}": a for k, (a, _) in grid.accuracy_by_distance(T).items()})
        self.log_scalars(trainer, metrics, step)
        self.log_figure(trainer, "passkey/accuracy_heatmap",
                        partial(plot_passkey_heatmap, grid, T, title=f"step {step}: passkey accuracy"), step)
        self.log_figure(trainer, "passkey/accuracy_vs_length", partial(plot_passkey_curve, grid, T, self.threshold),
                        step)
        atomic_write_json(os.path.join(self.out_dir(trainer), f"step_{step}.json"),
                          {"step": step, "seq_len": T, "metrics": metrics, "dtype": self.dtype,
                       "template_tokens": gen.min_length, "canonical_tokenization": gen.canonical,
                       **grid.to_dict(self.threshold, T), "seconds": time.perf_counter() - t0})
