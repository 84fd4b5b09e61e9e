"""When does the failure to forget set in? Every cell's evaluations along training, read back from its run folder.

The forgetting observers write one JSON per evaluation into the cell's log directory: ``lengthgen/step_N.json``
(the verdict and ratios) and ``state_stats/step_N.json`` (state RMS, variance growth past T_train, first-token
retention). From them, per cell: the history (step, tokens, verdict, ratio, heads whose alpha over T exceeds the
retention threshold, state growth past T, and from ``dynamics/step_N.json`` the slowest head's alpha over T) and
the onset, the step and token count of the first failing evaluation. Per row of the grid: T_forget at every
evaluation step (the smallest LEN that still forgets at that step), so a study shows the law forming along training,
not only at the end. With seeds, a seed cell is a cell like any other;
T_forget along training is per row and seed (``<row>_seed<s>``: one run's evaluations are not mixed with another's)
and ``onset_by_seed`` lists, per (row, LEN), every seed's first failing step: the spread of the onset. ``grid``
gives, per row and LEN, the runs failing at the end and ever, and the ratio at the end and at its peak.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from typing import Any

from ..analysis.decays import decay_stats
from .sweep import parse_cell_name
from .t_forget import t_forget_of

STEP_FILE = re.compile(r"step_(\d+)\.json$")


def read_steps(folder: str) -> dict[int, dict]:
    """step -> parsed JSON of ``folder/step_N.json`` (files that do not parse are skipped: a killed write leaves
    none, as they are written atomically, but a user may have edited one)."""
    out = {}
    for path in glob.glob(os.path.join(folder, "step_*.json")):
        match = STEP_FILE.search(path)
        if not match:
            continue
        try:
            with open(path) as f:
                out[int(match.group(1))] = json.load(f)
        except (OSError, ValueError):
            continue
    return out


def _retention(state: dict | None) -> dict[str, Any]:
    """Heads that never forget the first token, and state growth past T_train, from one state_stats JSON."""
    summary = ((state or {}).get("text") or {}).get("summary") or {}
    stats = ((state or {}).get("text") or {}).get("stats") or {}
    frac = next((v for k, v in summary.items() if k.startswith("frac_heads_above_")), None)
    threshold = next((float(k.rsplit("_", 1)[1]) for k in summary if k.startswith("frac_heads_above_")), 0.99)
    log_retention = stats.get("log_retention_T")  # (layers, heads) log alpha over T_train
    heads = None
    if log_retention is not None:
        heads = sum(1 for layer in log_retention for r in layer if r is not None and math.exp(r) > threshold)
    return {"heads_alpha_T_above": heads, "frac_heads_alpha_T_above": frac,
            "max_first_token": summary.get("max_first_token"), "state_norm_growth": summary.get("norm_growth"),
            "state_var_growth": summary.get("var_growth")}


def cell_history(cell_folder: str, tokens_per_batch: int | None = None) -> list[dict]:
    """The cell's evaluations in step order: step, tokens, forgets, ratios and retention/state figures."""
    lengthgen = read_steps(os.path.join(cell_folder, "lengthgen"))
    states = read_steps(os.path.join(cell_folder, "state_stats"))
    decays = read_steps(os.path.join(cell_folder, "dynamics"))
    history = []
    for step in sorted(lengthgen):
        entry = lengthgen[step]
        verdict = entry.get("verdict") or {}
        metrics = entry.get("metrics") or {}
        row = {"step": step, "tokens": None if tokens_per_batch is None else step * tokens_per_batch,
               "forgets": verdict.get("forgets"), "undetermined": verdict.get("undetermined"),
               "blowup_position": verdict.get("blowup_position"),
               "evaluated_to": verdict.get("evaluated_to")}
        for key in ("ratio_16_64x", "ratio_16_64x_lo", "ratio_16_64x_hi", "ratio_long_over_in"):
            if key in verdict:
                row[key] = verdict[key]
        row.update({k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("lengthgen/ratio")})
        row.update(_retention(states.get(step)))
        decay = decay_stats(decays[step]) if step in decays else None
        if decay is not None:  # the heads' decays at this step (kept where state_stats/ did not come back)
            row.update(decay_alpha_T_max=decay["alpha_T_max"], decay_heads_alpha_T_above=decay["heads_alpha_T_above"])
        history.append(row)
    return history


def onset_of(history: list[dict]) -> dict[str, Any]:
    """The first failing evaluation (step, tokens), whether the cell still fails at its last evaluation, and how
    many evaluations there were. ``step`` is None when no evaluation failed. An undetermined evaluation
    (``forgets`` None: a non-finite loss) does not fail."""
    failing = [h for h in history if h.get("forgets") is False]
    first = failing[0] if failing else None
    return {"step": None if first is None else first["step"], "tokens": None if first is None else first["tokens"],
            "evaluations": len(history), "fails_at_end": bool(history) and history[-1].get("forgets") is False,
            "last_step": history[-1]["step"] if history else None}


def t_forget_by_step(histories: dict[str, list[dict]], rows_of_cells: dict[str, tuple[str, int]]) -> dict:
    """T_forget per row at every evaluation step that all of the row's cells reached.

    ``histories``: cell -> history; ``rows_of_cells``: cell -> (row, LEN). At a step, T_forget is read from the
    row's verdicts there by :func:`.t_forget.t_forget_of` (the shortest LEN that forgets above the longest that
    fails); a row none of whose LENs fails has T_forget <= its shortest LEN, one whose longest LEN fails
    T_forget > it (``bound``). An undetermined evaluation counts as missing: a step where one of the row's LENs has
    it is left out."""
    by_row: dict[str, dict[int, dict[int, bool]]] = {}
    for cell, history in histories.items():
        row, seq_len = rows_of_cells[cell]
        for h in history:
            if h.get("forgets") is not None:
                by_row.setdefault(row, {}).setdefault(h["step"], {})[seq_len] = bool(h["forgets"])
    lens_of_row: dict[str, list[int]] = {}
    for row, seq_len in rows_of_cells.values():
        lens_of_row.setdefault(row, []).append(seq_len)
    out: dict[str, list[dict]] = {}
    for row, steps in by_row.items():
        lens = sorted(set(lens_of_row[row]))
        series = []
        for step in sorted(steps):
            passes = steps[step]
            if any(t not in passes for t in lens):
                continue  # some LEN has no evaluation at this step
            read = t_forget_of(lens, passes)
            entry = {"step": step, "t_forget": read["t_forget"], "bound": None}
            if read["t_forget_lower_bound"] is not None:
                entry["bound"] = f"> {read['t_forget_lower_bound']}"
            elif read["t_forget_upper_bound"] is not None:
                entry["bound"] = f"<= {read['t_forget_upper_bound']}"
            entry["passes"] = {str(t): passes[t] for t in lens}
            series.append(entry)
        out[row] = series
    return out


def grid_map(cells: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """Per row and LEN (the grid), over the cell's seeds: how many runs were evaluated, how many fail the 2x test
    at their last evaluation and at any evaluation, the ratio mean[16T,64T] / mean[T/2,T] at the end (mean over
    seeds) and its highest along training (over seeds), and the fewest and most steps its runs reached at their
    last evaluation (a map of unequal budgets says so). A cell that rose and recovered shows a peak well above its
    end; ``cells``: onset_summary's cells."""
    out: dict[str, dict[str, dict]] = {}
    for cell in cells.values():
        history = [h for h in cell["history"] if h.get("ratio_16_64x") is not None]
        if not history:
            continue
        entry = out.setdefault(cell["row"], {}).setdefault(str(cell["seq_len"]), {
            "runs": 0, "fail_at_end": 0, "failed_ever": 0, "ratio_end": [], "ratio_peak": None,
            "steps_min": None, "steps_max": None})
        entry["runs"] += 1
        entry["fail_at_end"] += history[-1].get("forgets") is False
        entry["failed_ever"] += any(h.get("forgets") is False for h in history)
        entry["ratio_end"].append(history[-1]["ratio_16_64x"])
        peak = max(h["ratio_16_64x"] for h in history)
        entry["ratio_peak"] = peak if entry["ratio_peak"] is None else max(entry["ratio_peak"], peak)
        step = history[-1].get("step")
        if step is not None:
            entry["steps_min"] = step if entry["steps_min"] is None else min(entry["steps_min"], step)
            entry["steps_max"] = step if entry["steps_max"] is None else max(entry["steps_max"], step)
    for row in out.values():
        for entry in row.values():
            entry["ratio_end"] = sum(entry["ratio_end"]) / len(entry["ratio_end"])
    return out


def onset_summary(cells_folder: str, cells: dict[str, tuple[str, int]], tokens_per_batch: int | None) -> dict:
    """Per cell: history and onset; per row (and seed): T_forget along training; with seeds, per (row, LEN) the
    onset of each seed. ``cells``: name -> (row, LEN)."""
    histories = {name: cell_history(os.path.join(cells_folder, name), tokens_per_batch) for name in cells}
    seeds = {name: (parse_cell_name(name) or (None, None, None))[2] for name in cells}
    out = {"cells": {name: {"row": cells[name][0], "seq_len": cells[name][1],
                            **({} if seeds[name] is None else {"seed": seeds[name]}), "onset": onset_of(h),
                            "history": h} for name, h in histories.items()},
           "t_forget_by_step": t_forget_by_step(histories, {
               name: (row if seeds[name] is None else f"{row}_seed{seeds[name]}", t)
               for name, (row, t) in cells.items()})}
    by_seed: dict[str, list[dict]] = {}
    for name in sorted((n for n in cells if seeds[n] is not None), key=lambda n: seeds[n]):
        row, t = cells[name]
        onset = out["cells"][name]["onset"]
        by_seed.setdefault(f"{row}_len{t}", []).append(
            {"seed": seeds[name], "step": onset["step"], "tokens": onset["tokens"],
             "fails_at_end": onset["fails_at_end"], "last_step": onset["last_step"]})
    if by_seed:
        out["onset_by_seed"] = by_seed
    out["grid"] = grid_map(out["cells"])
    return out
