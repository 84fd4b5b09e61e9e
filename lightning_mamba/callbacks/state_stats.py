"""State norms, outlier channels and forget-gate retention along a long input, during training."""

from __future__ import annotations

import os
import time
from functools import partial
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from ..analysis import plots
from ..analysis.criterion import default_bucket
from ..analysis.evaluator import eval_rows
from ..analysis.state_stats import newline_probe, state_statistics
from ..atomic import atomic_write_json
from ..training.run_checks import SettingError
from .length_generalization import JSON_DIGITS, PeriodicAnalysis, check_dtype

PROBES = ("text", "newlines")


class StateStatsCallback(PeriodicAnalysis):
    """Per layer and head: state RMS / mean / variance / outlier share every ``stride`` tokens, and the first
    token's retention alpha_{1:T_train}, on held-out text and (optionally) the newline token repeated.

    Args:
        every_n_validations: Run after every N-th validation (and at the end of fit).
        multiples: ``state/norm_max@{m}x`` is the max state RMS over heads and positions in (mT/2, mT]
            ((0, T] for 1x); the input is max(multiples) x T_train tokens long.
        n_rows: Held-out text rows (the newline probe uses one row: it is the same for every row).
        stride: Tokens between state samples (default T_train // 8, at least 16).
        probes: ``text`` (held-out text) and/or ``newlines`` (skipped, with a warning, when '\\n' is not one token).
        max_eval_tokens: Cap on the evaluated length.
        dtype: float32 (the paper's analysis precision), tf32 (float32 with TF32 matmuls on a GPU) or bfloat16.
        retention_threshold: A head "never forgets the first token" when alpha_{1:T_train} exceeds this.
        top_fraction: Outlier channels = this top share of a head's state entries.
        figures_every_n_runs: Draw the figures at the first run, every N-th, and at the end of fit (scalars and
            JSON every run).

    Logs (text probe) ``state/norm_max@1x``, ``state/norm_max@{max}x``, ``state/norm_growth`` (largest per-head
    ratio of the max RMS beyond T_train to the max within), ``state/var_growth``, ``state/outlier_share``
    (largest per-head variance share of the top entries, at the last position),
    ``retention/frac_heads_above_{threshold}``, ``retention/max_first_token``; the newline probe logs the same
    under ``state_newlines/`` and ``retention_newlines/``. Figures ``state/norm_vs_position`` and
    ``retention/heatmap`` (and ``state_newlines/norm_vs_position``); raw arrays in ``<log_dir>/state_stats/``.
    """

    name = "state_stats"

    def __init__(
        self,
        every_n_validations: int = 1,
        multiples: tuple[int, ...] | list[int] = (1, 16),
        n_rows: int = 1,
        stride: int | None = None,
        probes: tuple[str, ...] | list[str] = PROBES,
        max_eval_tokens: int | None = None,
        dtype: str = "float32",
        retention_threshold: float = 0.99,
        top_fraction: float = 0.01,
        figures_every_n_runs: int = 1,
    ):
        super().__init__(every_n_validations, figures_every_n_runs)
        name = type(self).__name__
        check_dtype(name, dtype)
        unknown = set(probes) - set(PROBES)
        if unknown:
            raise SettingError(f"{name}: unknown probes {sorted(unknown)}: use {', '.join(PROBES)}")
        # each was accepted here and failed at the first evaluation, after training (multiples [0]: no positions)
        if not multiples or not all(type(m) is int and m >= 1 for m in multiples):
            raise SettingError(f"{name}: multiples must be whole multiples of LEN >= 1, e.g. [1, 16] (got {multiples})")
        if n_rows < 1 or (stride is not None and stride < 1):
            raise SettingError(f"{name}: n_rows and stride must be >= 1 (got {n_rows}, {stride})")
        if not 0 < retention_threshold < 1 or not 0 < top_fraction <= 1:
            raise SettingError(f"{name}: retention_threshold must be in (0, 1) and top_fraction in (0, 1] "
                               f"(got {retention_threshold}, {top_fraction})")
        self.multiples = tuple(sorted(int(m) for m in multiples))
        self.n_rows, self.stride, self.probes = n_rows, stride, tuple(probes)
        self.max_eval_tokens, self.dtype = max_eval_tokens, dtype
        self.retention_threshold, self.top_fraction = retention_threshold, top_fraction

    def _inputs(self, data: Any, probe: str, length: int):
        if probe == "text":
            rows, info = eval_rows(data.val_tokens(), length, self.n_rows, getattr(data.tokenizer, "eos_id", None))
            if info["note"]:
                rank_zero_warn(f"state_stats: {info['note']}")
            return rows
        try:
            return newline_probe(data.tokenizer, length)
        except ValueError as e:
            rank_zero_warn(f"state_stats: newline probe skipped from now on ({e})")
            self.probes = tuple(p for p in self.probes if p != "newlines")
            return None

    def analyze(self, trainer: L.Trainer, model, data: Any, step: int) -> None:
        t0 = time.perf_counter()
        T = int(data.hparams.seq_len)
        length = self.eval_length(T)
        stride = self.stride or default_bucket(T)
        dump: dict = {"step": step, "seq_len": T, "stride": stride, "dtype": self.dtype}
        for probe in self.probes:
            rows = self._inputs(data, probe, length)
            if rows is None:
                continue
            stats = state_statistics(model, rows, T, stride, self.dtype, top_fraction=self.top_fraction, probe=probe)
            summary = stats.summary(self.multiples, self.retention_threshold)
            s, r = ("state", "retention") if probe == "text" else ("state_newlines", "retention_newlines")
            top = max(self.multiples)
            metrics = {f"{s}/norm_max@{m}x": summary.get(f"norm_max@{m}x") for m in {1, top}}
            metrics.update({f"{s}/norm_growth": summary.get("norm_growth"), f"{s}/var_growth": summary.get("var_growth"),
                            f"{s}/outlier_share": summary["outlier_share"],
                            f"{r}/frac_heads_above_{self.retention_threshold}":
                                summary.get(f"frac_heads_above_{self.retention_threshold}"),
                            f"{r}/max_first_token": summary.get("max_first_token")})
            self.log_scalars(trainer, metrics, step)
            self.log_figure(trainer, f"{s}/norm_vs_position", partial(
                plots.plot_state_norm, stats.positions, stats.rms, T, title=f"{probe}: state RMS, step {step}"), step)
            self.log_figure(trainer, f"{r}/log_retention_vs_position", partial(
                plots.plot_log_retention, stats.positions, stats.log_retention, T,
                title=f"{probe}: first-token retention, step {step}"), step)
            if stats.retention_T is not None:
                self.log_figure(trainer, f"{r}/heatmap", partial(
                    plots.plot_retention_heatmap, stats.retention_T, T, title=f"{probe}: alpha_(1:{T}), step {step}",
                    log_retention=stats.log_retention_T), step)
            dump[probe] = {"summary": summary, "stats": stats.to_dict()}
        dump["seconds"] = time.perf_counter() - t0
        atomic_write_json(os.path.join(self.out_dir(trainer), f"step_{step}.json"), dump, float_digits=JSON_DIGITS)
