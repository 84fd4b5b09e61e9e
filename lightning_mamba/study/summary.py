"""A study's summary from its cells' result.json files: T_forget per state size, the paper's laws fitted, figures.

``summarize(out)`` reads ``<out>/cells/*/result.json`` (and the plan in ``<out>/study.json`` when there) and writes
``results.csv`` (one row per cell), ``summary.json`` (per row of the grid: N_S both ways, passes per LEN,
T_forget or a lower bound; the fits beside the paper's constants), PNG figures and a TensorBoard run
``<out>/summary``. It can run at any time, e.g. after every shard has finished; a row with cells still missing
is reported as incomplete rather than guessed, unless the missing cell has evaluations along training
(``cells/<cell>/lengthgen/step_N.json``, a cell stopped early under a time budget): then its last evaluation gives a
provisional verdict (:func:`provisional_results`), used for T_forget like a final one but marked as such everywhere
(``rows[].provisional``, the T_forget text, the table, the fits, the notes); a result.json, once written, wins. A
study with seeds has several runs per (row, LEN): their majority verdict places T_forget (:func:`majority_verdict`),
and each seed's own T_forget is reported beside it.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os

import numpy as np

from ..analysis import plots
from ..analysis.criterion import verdict_word
from ..analysis.fits import N_S_UNIT, PAPER_T_FORGET, PAPER_T_RECALL, T_UNIT, fit_exponential, fit_linear
from ..analysis.plots import plt
from ..atomic import atomic_write_text
from .onset import onset_summary
from .sweep import Study, SweepError, clean, parse_cell_name, write_json

# seed: the seed_everything the cell trained with (result.json has it for every cell, replicate or not)
CSV_FIELDS = ("cell", "row", "d_state", "n_layer", "d_model", "seq_len", "seed", "batch_size", "steps", "tokens", "params",
              "n_s", "n_s_ssm_only", "forgets", "blowup_position", "blowup_over_len", "max_in_window",
              "ratio_4_16x", "ratio_16_64x", "ratio_16_64x_lo", "ratio_16_64x_hi", "ratio_far", "ratio_far_lo",
              "ratio_far_hi", "evaluated_to", "val_loss", "t_recall", "train_seconds", "eval_seconds")
FAR_KEYS = ("ratio_far", "ratio_far_lo", "ratio_far_hi")  # result.json's metrics (none in a result from before them)


def load_results(out: str) -> list[dict]:
    results = []
    for path in sorted(glob.glob(os.path.join(out, "cells", "*", "result.json"))):
        with open(path) as f:
            results.append(json.load(f))
    return results


def load_plan(out: str) -> dict | None:
    path = os.path.join(out, "study.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def blowup_over_len(r: dict) -> float | None:
    pos = r["verdict"]["blowup_position"]
    return None if pos is None else pos / r["seq_len"]


def csv_row(r: dict) -> dict:
    v = r["verdict"]
    pk = r.get("passkey") or {}
    return {**{k: r.get(k) for k in CSV_FIELDS},
            "forgets": None if v["forgets"] is None else int(v["forgets"]),  # undetermined: an empty field
            "blowup_position": v["blowup_position"],
            "blowup_over_len": blowup_over_len(r),
            "max_in_window": v["max_in_window"], "ratio_4_16x": v["ratio_long_over_in"],
            **{k: v.get(k) for k in ("ratio_16_64x", "ratio_16_64x_lo", "ratio_16_64x_hi")},
            **{k: (r.get("metrics") or {}).get(k) for k in FAR_KEYS},
            "evaluated_to": v["evaluated_to"], "t_recall": pk.get("t_recall")}


def seed_of(name: str) -> int | None:
    """The replicate seed in a cell's name (``..._seed<s>``); None for a cell of a study without seeds."""
    parsed = parse_cell_name(name)
    return None if parsed is None else parsed[2]


def majority_verdict(forgets: list[bool | None], planned: int) -> bool | None:
    """One (row, LEN)'s verdict from its runs' (seeds') verdicts: forgets (True) or fails (False) when a strict
    majority of its planned runs say so; None on a tie, when undetermined runs leave no majority, or while too few
    runs have finished to decide (so a verdict, once given, cannot flip as more seeds finish). With one run per cell
    this is that run's verdict."""
    n = max(planned, len(forgets))
    for verdict in (True, False):
        if 2 * forgets.count(verdict) > n:
            return verdict
    return None


def t_forget_of(lens: list[int], verdicts: dict[int, bool]) -> dict:
    """T_forget = the smallest LEN that forgets when every shorter one fails. ``verdicts``: LEN -> forgets, for the
    LENs that have one (a LEN absent is missing or undetermined: T_forget cannot be named past it)."""
    out = {"t_forget": None, "t_forget_lower_bound": None, "t_forget_upper_bound": None, "status": "incomplete"}
    for t in lens:
        if t not in verdicts:
            return out  # a shorter LEN is not done yet (or has no verdict)
        if verdicts[t] and t == lens[0]:
            # the grid's shortest LEN already forgets: T_forget is at most t, the grid cannot say more
            return {**out, "t_forget_upper_bound": t, "status": "at_or_below_min_len"}
        if verdicts[t]:
            return {**out, "t_forget": t, "status": "measured"}
    return {**out, "t_forget_lower_bound": max(lens), "status": "above_max_len"} if lens else out


def lens_deciding(lens: list[int], verdicts: dict[int, bool]) -> list[int]:
    """The LENs :func:`t_forget_of` reads to place T_forget (or its bound, or to stop short of one): the shortest
    ones up to and including the first that forgets or has no verdict."""
    out = []
    for t in lens:
        out.append(t)
        if verdicts.get(t, True):
            break
    return out


def t_forget_text(entry: dict, why_incomplete: str = "", provisional: str = "") -> str:
    """``64``, ``> 128``, ``<= 32`` or ``incomplete (missing LEN 64)``; ``provisional`` (:func:`provisional_text`)
    is added in parentheses: ``64 (provisional: LEN 32 at step 7,101, LEN 64 at step 10,501 of 20,000)``."""
    if entry["t_forget"] is None and not entry["t_forget_lower_bound"] and not entry["t_forget_upper_bound"]:
        why = "; ".join(filter(None, (why_incomplete, provisional)))
        return "incomplete" + (f" ({why})" if why else "")
    text = (str(entry["t_forget"]) if entry["t_forget"] is not None else
            f"> {entry['t_forget_lower_bound']}" if entry["t_forget_lower_bound"] else
            f"<= {entry['t_forget_upper_bound']}")
    return text + (f" ({provisional})" if provisional else "")


# ---- provisional verdicts: a cell stopped early, judged by its last evaluation along training ---------------------
MODEL_KEYS = ("d_state", "n_layer", "d_model", "n_s", "n_s_ssm_only", "params")


def planned_steps(plan: dict | None) -> int | None:
    """The steps every cell of the study trains (tokens_per_cell // tokens_per_batch); None when the plan is not
    known."""
    try:
        return int(plan["tokens_per_cell"]) // int(plan["tokens_per_batch"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def final_eval_length(plan: dict | None, seq_len: int) -> int | None:
    """How far the cell's final evaluation would go (:meth:`Study.eval_length` of the plan); None when unknown."""
    known = {f for f in Study.__dataclass_fields__ if f in (plan or {})}
    if "eval_multiple" not in known:
        return None
    try:
        return Study(**{f: plan[f] for f in known}).eval_length(seq_len)
    except (TypeError, ValueError):
        return None


def model_of_cell(folder: str) -> dict:
    """d_state, n_layer, d_model and N_S (both ways) of the model a cell trains, from its run's ``config.yaml``
    (a row whose cells have no result.json yet is placed by its state size); {} when it is absent or unreadable."""
    import yaml

    from ..training.checkpoint_io import model_config

    try:
        with open(os.path.join(folder, "config.yaml")) as f:
            model = (yaml.safe_load(f) or {}).get("model") or {}
        model = model.get("init_args", model)
        cfg = model_config(**{k: v for k, v in model.items() if isinstance(k, str)})
        return {"d_state": cfg.mixer["d_state"], "n_layer": cfg.n_layer, "d_model": cfg.d_model,
                "n_s": cfg.state_size(), "n_s_ssm_only": cfg.state_size(ssm_only=True)}
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError, KeyError):
        return {}


def provisional_results(plan: dict | None, results: list[dict], onset: dict, out: str) -> list[dict]:
    """A provisional result for every planned cell without a result.json that has evaluations along training
    (``onset["cells"][cell]["history"]``, :func:`.onset.onset_summary`): its LAST evaluation's verdict (forgets,
    fails, or undetermined: a non-finite loss), by the same 2x criterion, under ``provisional``: the step, the
    study's planned steps, how far it evaluated and how far the final evaluation would. :func:`rows_of` uses them
    as it uses final results (a final result of the same cell wins) and marks what they decide."""
    done = {r["cell"] for r in results}
    steps = planned_steps(plan)
    early = []
    for name in (plan or {}).get("cells", []):
        parsed = parse_cell_name(name)
        history = (onset["cells"].get(name) or {}).get("history") or []
        if name in done or parsed is None or not history:
            continue
        last = history[-1]
        row, t, seed = parsed
        early.append({
            "cell": name, "row": row, "seq_len": t, **({} if seed is None else {"seed": seed}),
            "verdict": {"forgets": last.get("forgets"), "blowup_position": last.get("blowup_position"),
                        "evaluated_to": last.get("evaluated_to"), "undetermined": last.get("undetermined")},
            "provisional": {"step": last["step"], "planned_steps": steps, "evaluated_to": last.get("evaluated_to"),
                            "final_eval_length": final_eval_length(plan, t)},
            **model_of_cell(os.path.join(out, "cells", name))})
    return early


def provisional_mark(r: dict) -> dict:
    """What ``rows[].provisional`` says of one cell: its name, the step of the evaluation that gave its verdict, the
    study's planned steps, how far that evaluation went (and the seed, with seeds)."""
    p = r["provisional"]
    seed = seed_of(r["cell"])
    return {"cell": r["cell"], **({} if seed is None else {"seed": seed}), "step": p["step"],
            "planned_steps": p["planned_steps"], "evaluated_to": p["evaluated_to"]}


def provisional_text(marks: list[tuple[int, dict]]) -> str:
    """``provisional: LEN 32 at step 7,101, LEN 64 seed 1 at step 10,501 of 20,000`` for (LEN, mark) pairs; the
    planned steps once at the end when they are the same for all (they are, in one study)."""
    if not marks:
        return ""
    planned = {m["planned_steps"] for _, m in marks}
    common = next(iter(planned)) if len(planned) == 1 else None
    parts = [f"LEN {t}" + (f" seed {m['seed']}" if m.get("seed") is not None else "") + f" at step {m['step']:,}"
             + (f" of {m['planned_steps']:,}" if common is None and m["planned_steps"] is not None else "")
             for t, m in marks]
    return "provisional: " + ", ".join(parts) + (f" of {common:,}" if common is not None else "")


def rows_of(results: list[dict], plan: dict | None, provisional: list[dict] | None = None) -> list[dict]:
    """One entry per row of the grid (a state size, or a model), in plan order: T_forget = smallest passing LEN.
    A cell whose verdict is undetermined (``forgets`` None: a non-finite loss) counts as missing, as one without a
    result does; ``undetermined_lens`` names those LENs. With seeds, a LEN's verdict is its seeds' majority
    (:func:`majority_verdict`): undecided after all its seeds finished it is undetermined, before that missing; a
    seeded row also gets ``seeds``, ``fails_per_len`` (counts per LEN) and ``t_forget_per_seed``.

    ``provisional`` (:func:`provisional_results`): verdicts of cells without a result.json, from their last
    evaluation along training, counted like final ones; a final result of the same cell wins. A row that uses one
    gets ``provisional`` (LEN -> :func:`provisional_mark` of its cell; with seeds, a list of its seeds' marks) and
    ``t_forget_provisional`` (whether T_forget, or its bound, rests on one), and its ``t_forget_text`` names them;
    a row without any keeps the keys it always had."""
    planned: dict[str, dict[int, list]] = {}  # row -> LEN -> the planned runs' seeds (None: no seeds)
    for row, t, seed in filter(None, map(parse_cell_name, (plan or {}).get("cells", []))):
        planned.setdefault(row, {}).setdefault(t, []).append(seed)
    done = {r["cell"] for r in results}
    runs_all = [*results, *(p for p in provisional or [] if p["cell"] not in done)]  # a final result wins
    order = list(dict.fromkeys([*planned, *(r["row"] for r in runs_all)]))
    rows = []
    for name in order:
        runs: dict[int, list[dict]] = {}  # LEN -> its finished (or provisional) runs, in seed order
        for r in sorted((r for r in runs_all if r["row"] == name), key=lambda r: seed_of(r["cell"]) or 0):
            runs.setdefault(r["seq_len"], []).append(r)
        lens = sorted(set(planned.get(name, {})) | set(runs))
        n_planned = {t: len(planned.get(name, {}).get(t, [])) for t in lens}
        forgets = {t: [r["verdict"]["forgets"] for r in runs.get(t, [])] for t in lens}
        early = {t: [r for r in runs.get(t, []) if "provisional" in r] for t in lens}
        verdict = {t: majority_verdict(forgets[t], n_planned[t]) for t in runs}
        missing = [t for t in lens if t not in runs or (verdict[t] is None and len(runs[t]) < n_planned[t])]
        undetermined = [t for t in lens if t in runs and verdict[t] is None and t not in missing]
        seeds = sorted({s for ss in planned.get(name, {}).values() for s in ss if s is not None}
                       | {s for rs in runs.values() for r in rs if (s := seed_of(r["cell"])) is not None})
        decided = {t: v for t, v in verdict.items() if v is not None}
        entry = {"row": name, "lens": lens, "missing_lens": missing, "undetermined_lens": undetermined,
                 "passes": {str(t): verdict[t] for t in lens if t in runs},
                 "blowup_over_len": {str(t): [blowup_over_len(r) for r in runs[t]] if seeds
                                     else blowup_over_len(runs[t][0]) for t in lens if t in runs},
                 **t_forget_of(lens, decided)}
        # the model's figures: from a final result when there is one, else from a provisional cell's config.yaml
        first = next((r for rs in runs.values() for r in rs if "provisional" not in r),
                     next((rs[0] for rs in runs.values()), None))
        if first is not None:
            entry.update({k: first[k] for k in MODEL_KEYS if k in first})
        if entry["t_forget"] is not None:  # the paper's law assumes every longer LEN passes too
            entry["fails_above_t_forget"] = [t for t in lens if t > entry["t_forget"] and verdict.get(t) is False]
        marks = [(t, provisional_mark(r)) for t in lens_deciding(lens, decided) for r in early[t]]
        entry["t_forget_text"] = t_forget_text(entry, "; ".join(
            f"{what} LEN " + ", ".join(map(str, lens_))
            for what, lens_ in (("missing", missing), ("undetermined", undetermined)) if lens_),
            provisional_text(marks))
        any_early = any(early.values())
        if any_early:
            entry["provisional"] = {str(t): [provisional_mark(r) for r in early[t]] if seeds
                                    else provisional_mark(early[t][0]) for t in lens if early[t]}
            entry["t_forget_provisional"] = bool(marks)
        if seeds:
            entry["seeds"] = seeds
            entry["fails_per_len"] = {}
            for t in lens:
                counts = {"fails": forgets[t].count(False), "forgets": forgets[t].count(True),
                          "undetermined": forgets[t].count(None), "finished": len(forgets[t]) - len(early[t]),
                          "planned": max(n_planned[t], len(forgets[t]))}
                if any_early:  # runs counted above from their last evaluation along training, not finished
                    counts["provisional"] = len(early[t])
                entry["fails_per_len"][str(t)] = counts
            entry["t_forget_per_seed"] = []
            for seed in seeds:  # each seed as a study of its own
                mine = {t: r for t in runs for r in runs[t] if seed_of(r["cell"]) == seed}
                own = {t: r["verdict"]["forgets"] for t, r in mine.items() if r["verdict"]["forgets"] is not None}
                per_seed = t_forget_of(lens, own)
                seed_marks = [(t, provisional_mark(mine[t])) for t in lens_deciding(lens, own)
                              if "provisional" in mine.get(t, {})]
                entry["t_forget_per_seed"].append({"seed": seed, **per_seed, "t_forget_text": t_forget_text(
                    per_seed, provisional=provisional_text(seed_marks))})
                if seed_marks:
                    entry["t_forget_per_seed"][-1]["t_forget_provisional"] = True
        recalls = [(r.get("passkey") or {}).get("t_recall") for rs in runs.values() for r in rs if r.get("passkey")]
        entry["t_recall"] = max((x for x in recalls if x is not None), default=None) if recalls else None
        entry["passkey_ran"] = bool(recalls)
        rows.append(entry)
    return rows


def fit_entry(fit, n: int, paper: dict, min_points: int, provisional_rows: list[str] = ()) -> dict:
    """The fit (or why none), its points and the paper's constants; ``provisional: true`` and ``provisional_rows``
    when some of its points are provisional T_forgets (from evaluations along training, not final results)."""
    mark = {"provisional": True, "provisional_rows": list(provisional_rows)} if provisional_rows else {}
    if fit is None:
        return {"fit": None, "n_points": n, "reason": f"no fit: {n} finite point(s), needs at least {min_points} "
                "with different N_S", "paper": paper, **mark}
    return {"fit": fit._asdict(), "n_points": n, "paper": paper, **mark}


def fits_of(rows: list[dict]) -> dict:
    """T_forget (K tokens) vs N_S (M), both N_S conventions; T_recall likewise when passkey ran. A row whose
    T_forget is provisional (``t_forget_provisional``) is a point of the fit, which then says so; a bound resting
    on a provisional verdict says so too."""
    measured = [r for r in rows if r["t_forget"] is not None and "n_s" in r]
    early = [r["row"] for r in measured if r.get("t_forget_provisional")]
    out = {"units": {"n_s": "millions (1e6)", "t": f"K tokens (1K = {T_UNIT})"}, "t_forget": {}, "t_recall": {}}
    y = [r["t_forget"] / T_UNIT for r in measured]
    for key, label in (("n_s", "paper_convention"), ("n_s_ssm_only", "ssm_only")):
        x = [r[key] / N_S_UNIT for r in measured]
        out["t_forget"][label] = fit_entry(fit_linear(x, y), len(x), PAPER_T_FORGET, 2, early)

    def mark(r: dict) -> dict:
        return {"provisional": True} if r.get("t_forget_provisional") else {}

    out["t_forget"]["lower_bounds"] = [
        {"row": r["row"], "n_s": r.get("n_s"), "t_forget_above": r["t_forget_lower_bound"], **mark(r)}
        for r in rows if r["t_forget_lower_bound"] is not None]
    out["t_forget"]["upper_bounds"] = [
        {"row": r["row"], "n_s": r.get("n_s"), "t_forget_at_most": r["t_forget_upper_bound"], **mark(r)}
        for r in rows if r["t_forget_upper_bound"] is not None]
    recall = [r for r in rows if r["t_recall"] is not None and "n_s" in r]
    if any(r["passkey_ran"] for r in rows):
        yr = [r["t_recall"] / T_UNIT for r in recall]
        for key, label in (("n_s", "paper_convention"), ("n_s_ssm_only", "ssm_only")):
            xr = [r[key] / N_S_UNIT for r in recall]
            out["t_recall"][label] = fit_entry(fit_exponential(xr, yr), len(xr), PAPER_T_RECALL, 3)
    else:
        out["t_recall"] = {"fit": None, "reason": "passkey did not run (study.passkey: false)", "paper": PAPER_T_RECALL}
    return out


# ---- figures ----------------------------------------------------------------------------------------------
T_UNITS = ((T_UNIT**2, "M tokens, 1M = 2^20"), (T_UNIT, f"K tokens, 1K = {T_UNIT}"), (1, "tokens"))
N_S_UNITS = ((1e9, "billions"), (N_S_UNIT, "millions"), (1e3, "thousands"), (1, "entries"))


def axis_unit(values, units) -> tuple[float, str]:
    """(scale, name) of the largest of ``units`` (descending) in which the largest value is at least 1, so an axis
    reads 32 tokens or 0.8 millions rather than 0.03 K tokens or 0.0016 millions."""
    top = max((abs(v) for v in values), default=0)
    return next(((scale, name) for scale, name in units if top >= scale), units[-1])


def plot_t_forget(rows: list[dict], fits: dict) -> plt.Figure:
    """T_forget vs N_S: measured points, lower and upper bounds and the linear fit, each in the legend only when
    drawn; both axes in the unit that suits the numbers (tokens below 1K, thousands of state entries below 1M). A
    provisional point (resting on a cell's last evaluation along training) is drawn hollow."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    placed = [r for r in rows if "n_s" in r]
    kinds = (("t_forget", "o", "C0", "T_forget (measured)"),
             ("t_forget_lower_bound", "^", "C3", "> max LEN (lower bound: no LEN of the grid forgets)"),
             ("t_forget_upper_bound", "v", "C2", "<= min LEN (upper bound: the shortest LEN forgets)"))
    points = {key: [r for r in placed if r[key] is not None] for key, *_ in kinds}
    # with seeds: each seed's measured T_forget, small, beside the majority's
    per_seed = [(r["n_s"], e["t_forget"]) for r in placed for e in r.get("t_forget_per_seed", [])
                if e["t_forget"] is not None]
    x_scale, x_name = axis_unit([r["n_s"] for r in placed], N_S_UNITS)
    t_scale, t_name = axis_unit([r[key] for key, rs in points.items() for r in rs] + [t for _, t in per_seed],
                                T_UNITS)
    for key, marker, color, label in kinds:
        for early in (False, True):
            drawn = [r for r in points[key] if bool(r.get("t_forget_provisional")) is early]
            if drawn:
                ax.plot([r["n_s"] / x_scale for r in drawn], [r[key] / t_scale for r in drawn], marker, color=color,
                        markersize=7, linestyle="none", markerfacecolor="none" if early else color,
                        label=label + (", provisional (last evaluation along training)" if early else ""))
    if per_seed:
        ax.plot([n / x_scale for n, _ in per_seed], [t / t_scale for _, t in per_seed], "x", color="0.4",
                markersize=5, linestyle="none", label="T_forget of one seed (the circle: their majority)")
    shown = [(r["n_s"], r[key], r["row"]) for key, rs in points.items() for r in rs]
    if len(shown) <= 12:
        for n_s, t, name in shown:
            ax.annotate(name, (n_s / x_scale, t / t_scale), textcoords="offset points", xytext=(5, 4), fontsize=7)
    entry = fits["t_forget"]["paper_convention"]
    f = entry["fit"]
    if f is not None:  # fitted in the paper's units: N_S in millions, T in K tokens
        xs = np.linspace(0, max(r["n_s"] for r in placed) * 1.05, 50)
        ax.plot(xs / x_scale, (f["a"] * xs / N_S_UNIT + f["b"]) * T_UNIT / t_scale, "-", color="C0", alpha=0.6,
                label=f"fit {f['a']:.3g} N_S {f['b']:+.3g} (N_S in M, T in K; R^2 {f['r2']:.3f})")
    elif entry.get("reason"):
        ax.text(0.02, 0.97, entry["reason"], transform=ax.transAxes, fontsize=7, color="0.3", va="top")  # the
        # legend's corner is chosen among the data (loc "best"), which the text is not
    ax.set_xlim(left=0)
    if shown:
        ax.set_xlim(right=max(n for n, _, _ in shown) / x_scale * 1.15)
        ax.set_ylim(bottom=0, top=max([t for _, t, _ in shown] + [t for _, t in per_seed]) / t_scale * 1.2)
    ax.set_xlabel(f"N_S ({x_name}, paper convention)")
    ax.set_ylabel(f"T_forget ({t_name})")
    ax.set_title(f"T_forget vs state size (paper: {PAPER_T_FORGET['a']} N_S - {-PAPER_T_FORGET['b']}, "
                 "N_S in M, T in K tokens)", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _grid(results: list[dict], names: list[str], extra_width: float = 0.0):
    """A figure of (row, LEN) panels; ``by``: (row, LEN) -> the runs of that panel (several with seeds)."""
    lens = sorted({r["seq_len"] for r in results})
    names = [name for name in names if any(x["row"] == name for x in results)]
    fig, axes = plt.subplots(len(names), len(lens), figsize=(2.6 * len(lens) + 0.5 + extra_width,
                                                             2.1 * len(names) + 0.9),
                             squeeze=False, sharey="row", layout="constrained")
    by: dict[tuple[str, int], list[dict]] = {}
    for r in results:
        by.setdefault((r["row"], r["seq_len"]), []).append(r)
    return fig, axes, names, lens, by


CURVE_COLORS = {True: "C0", False: "C3", None: "C7"}  # forgets, fails, undetermined (grey)
VERDICT_WORDS = {True: "forgets", False: "FAILS", None: "undetermined"}  # a cell's verdict in a title or table


def plot_curve_grid(results: list[dict], rows: list[dict]) -> plt.Figure:
    """Loss vs position for every cell (rows: state sizes, columns: LEN), LEN and the failure line marked and
    named in the figure's legend; with seeds, a panel draws every seed's curve (and threshold line)."""
    from matplotlib.lines import Line2D

    fig, axes, names, lens, by = _grid(results, [r["row"] for r in rows])
    factors, passed = set(), set()
    for i, name in enumerate(names):
        for j, t in enumerate(lens):
            ax = axes[i][j]
            runs = by.get((name, t))
            if runs is None:
                ax.set_axis_off()
                continue
            for r in runs:
                v = r["verdict"]
                factors.add(v["threshold"])
                passed.add(v["forgets"])
                # a non-finite loss is null in result.json: numpy reads it as NaN, a gap in the line
                loss = np.array(r["curve"]["loss"], dtype=float)
                ax.plot(r["curve"]["positions"], loss, linewidth=1, color=CURVE_COLORS[v["forgets"]])
                if v["max_in_window"] is not None and np.isfinite(v["max_in_window"]):  # none when undetermined
                    ax.axhline(v["threshold"] * v["max_in_window"], color="r", linestyle=":", linewidth=0.8)
            ax.axvline(t, color="k", linestyle="--", linewidth=0.8)
            plots._log_positions(ax)
            verdicts = [r["verdict"]["forgets"] for r in runs]
            word = (VERDICT_WORDS[verdicts[0]] if seed_of(runs[0]["cell"]) is None
                    else f"fails {verdicts.count(False)}/{len(verdicts)}")
            ax.set_title(f"{name} LEN {t}: {word}", fontsize=8)
            ax.tick_params(labelsize=7)
    factor = f"{next(iter(factors)):g}" if len(factors) == 1 else "threshold"
    handles = [Line2D([], [], color=CURVE_COLORS[f], linewidth=1, label=label)
               for f, label in ((True, "loss, cell forgets"), (False, "loss, cell FAILS to forget"),
                                (None, "loss, cell undetermined (a non-finite loss)")) if f in passed]
    handles += [Line2D([], [], color="k", linestyle="--", linewidth=0.8, label="LEN (T_train)"),
               Line2D([], [], color="r", linestyle=":", linewidth=0.8,
                      label=f"failure threshold: {factor} x max bucket loss within LEN")]
    # two columns of entries need two columns of cells' width: a one-LEN grid stacks them (else they are cut off)
    fig.legend(handles=handles, loc="outside upper center", ncol=2 if len(lens) > 1 else 1, fontsize=7, frameon=False)
    fig.supxlabel("position (tokens)", fontsize=9)
    fig.supylabel("loss (bucket mean)", fontsize=9)
    return fig


def plot_passkey_grid(results: list[dict], rows: list[dict]) -> plt.Figure | None:
    """Passkey accuracy heatmaps (depth x prompt length) for every cell that ran it, one labelled 0-1 colour bar,
    the values in the cells when they are few; with seeds, one figure row per row and seed."""
    from ..analysis.passkey import draw_accuracy_heatmap

    order = {r["row"]: i for i, r in enumerate(rows)}
    ran = sorted((r for r in results if r.get("passkey")), key=lambda r: (order[r["row"]], seed_of(r["cell"]) or 0))
    if not ran:
        return None
    results = [{**r, "row": r["row"] + ("" if seed_of(r["cell"]) is None else f" seed {seed_of(r['cell'])}")}
               for r in ran]
    fig, axes, names, lens, by = _grid(results, list(dict.fromkeys(r["row"] for r in results)), extra_width=0.8)
    image = None
    for i, name in enumerate(names):
        for j, t in enumerate(lens):
            ax = axes[i][j]
            pk = (by.get((name, t)) or [{}])[0].get("passkey")
            if not pk:
                ax.set_axis_off()
                continue
            image = draw_accuracy_heatmap(ax, pk["accuracy"], pk["lengths"], pk["depths"], t, annotate_max_cells=40,
                                          fontsize=7)
            ax.set_title(f"{name} LEN {t}: T_recall {pk['t_recall'] or 'none'}", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label="exact-match accuracy")
    fig.supxlabel("prompt length (tokens; red dashes: after LEN)", fontsize=9)
    fig.supylabel("needle depth", fontsize=9)
    return fig


# ---- the summary ------------------------------------------------------------------------------------------
def cells_of(plan: dict | None, results: list[dict], out: str | None = None) -> dict[str, tuple[str, int]]:
    """Every planned, finished or started cell (a folder under ``<out>/cells`` with evaluations: shards run with
    other --states/--lens write there too) -> (row, LEN); cell names are ``<row>_len<LEN>[_seed<s>]``."""
    started = [] if out is None else sorted(
        os.path.basename(os.path.dirname(d)) for d in glob.glob(os.path.join(out, "cells", "*_len*", "lengthgen")))
    names = list(dict.fromkeys([*(plan or {}).get("cells", []), *(r["cell"] for r in results), *started]))
    parsed = {name: parse_cell_name(name) for name in names}
    return {name: p[:2] for name, p in parsed.items() if p is not None}


def onset_lines(onset: dict) -> list[str]:
    """Where the failure set in along training: per cell the first failing evaluation (an undetermined one, a
    non-finite loss, is not failing: such evaluations are named on a line of their own), per row T_forget by step."""
    lines = []
    for name, cell in onset["cells"].items():
        o, history = cell["onset"], cell.get("history") or []
        if o["step"] is not None:
            tokens = f" ({o['tokens'] / 1e6:.1f}M tokens)" if o["tokens"] is not None else ""
            still = ("still fails at its last evaluation" if o["fails_at_end"] else
                     "forgets again by its last" if history[-1].get("forgets") else "undetermined at its last")
            lines.append(f"onset: {name} fails first at step {o['step']}{tokens}; {still} (step {o['last_step']})")
        undetermined = [h for h in history if h.get("forgets") is None]
        if undetermined:
            lines.append(f"onset: {name} is {verdict_word(undetermined[0], reason='short')} at step(s) "
                         f"{', '.join(str(h['step']) for h in undetermined)}: not counted as failing")
    for cell, seeds in onset.get("onset_by_seed", {}).items():  # the spread of the onset, where a seed failed
        if all(e["step"] is None for e in seeds):
            continue
        lines.append(f"onset by seed, {cell}: " + ", ".join(
            f"seed {e['seed']} " + (f"step {e['step']}" if e["step"] is not None else
                                    f"never (to step {e['last_step']})" if e["last_step"] is not None else "no evaluation")
            for e in seeds))
    for row, series in onset["t_forget_by_step"].items():
        if series:
            steps = ", ".join(f"{e['step']}: {e['t_forget'] if e['t_forget'] is not None else e['bound']}"
                              for e in series)
            lines.append(f"T_forget along training, {row}: {steps}")
    return lines


def summarize(out: str, tensorboard: bool = True) -> dict:
    """Write results.csv, summary.json, PNGs and (optionally) the TensorBoard run ``<out>/summary``."""
    plan = load_plan(out)
    results = load_results(out)
    if plan is None and not results:
        raise SweepError(f"no study under {out}: neither study.json nor cells/*/result.json (wrong --out?)")
    onset = onset_summary(os.path.join(out, "cells"), cells_of(plan, results, out), (plan or {}).get("tokens_per_batch"))
    early = provisional_results(plan, results, onset, out)
    rows = rows_of(results, plan, early)
    order = {r["row"]: i for i, r in enumerate(rows)}
    results.sort(key=lambda r: (order[r["row"]], r["seq_len"], seed_of(r["cell"]) or 0))
    fits = fits_of(rows)
    budgets = sorted({r["tokens"] for r in results})
    notes = []
    if len(budgets) > 1:
        notes.append(f"cells trained on different budgets {budgets}: the rows are not comparable")
    if rows and all(r["status"] == "at_or_below_min_len" for r in rows):
        notes.append("every row already forgets at the shortest LEN: T_forget is below the grid, no law can be fitted "
                     "(shorter lens or far more training per cell would be needed to find it)")
    if any("seeds" in r for r in rows):
        notes.append("seeds: a LEN forgets or fails when a strict majority of its seeds do; a tie (or too few seeds "
                     "finished to decide) leaves it undetermined (or missing) for T_forget; each seed's own T_forget "
                     "is in rows[].t_forget_per_seed")
    missing = [c for c in (plan or {}).get("cells", []) if c not in {r["cell"] for r in results}]
    if missing:
        notes.append(f"{len(missing)} planned cell(s) have no result yet: {', '.join(missing)}")
    if early:
        notes.append(f"{len(early)} of them gave a provisional verdict, from their last evaluation along training "
                     "(used for T_forget until their result.json is written): "
                     + "; ".join(provisional_note(r) for r in early))
    undetermined = [r for r in results if r["verdict"]["forgets"] is None]
    if undetermined:
        notes.append(f"{len(undetermined)} cell(s) have an undetermined verdict, counted as missing for T_forget: "
                     + "; ".join(f"{r['cell']}: {verdict_word(r['verdict'], reason='short')}" for r in undetermined)
                     + " (the reason in each cell's result.json, verdict.undetermined)")
    # out as given, not made absolute: a summary copied with its folder names no path of the machine it ran on
    summary = {"out": os.path.normpath(out), "cells_done": len(results), "cells_missing": missing,
               "tokens_per_cell": budgets, "axis": "models" if (plan or {}).get("models") else "states",
               "rows": rows, "fits": fits, "notes": notes, "onset": onset}
    if early:  # cell -> its provisional verdict (the last evaluation along training)
        summary["cells_provisional"] = {r["cell"]: {"row": r["row"], "seq_len": r["seq_len"], "forgets":
                                                    r["verdict"]["forgets"], **r["provisional"]} for r in early}
    os.makedirs(out, exist_ok=True)
    summary = clean(summary)
    onset_figure = plot_onset(summary["onset"])
    if onset_figure is not None:
        plots.save_png(onset_figure, os.path.join(out, "onset.png"))
    write_json(os.path.join(out, "summary.json"), summary)
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=CSV_FIELDS)
    w.writeheader()
    w.writerows(clean([csv_row(r) for r in results]))
    atomic_write_text(os.path.join(out, "results.csv"), table.getvalue())
    if results or early:
        write_figures(out, results, rows, fits, tensorboard)
    return summary


def provisional_note(r: dict) -> str:
    """``state1024_len64: FAILS at step 10,501 of 20,000``, and how far it evaluated when short of the final
    evaluation's length."""
    p = r["provisional"]
    text = (f"{r['cell']}: {VERDICT_WORDS[r['verdict']['forgets']]} at step {p['step']:,}"
            + (f" of {p['planned_steps']:,}" if p["planned_steps"] is not None else ""))
    if p["evaluated_to"] is not None and p["final_eval_length"] is not None and p["evaluated_to"] < p["final_eval_length"]:
        text += f" (evaluated to {p['evaluated_to']:,} tokens, the final evaluation to {p['final_eval_length']:,})"
    return text


def plot_onset(onset: dict) -> plt.Figure | None:
    """Per cell, the ratio mean[16T,64T] / mean[T/2,T] at every evaluation along training, with its bootstrap 95%
    interval; filled markers where the evaluation fails the 2x criterion. None without any ratio."""
    cells = {name: [h for h in c["history"] if h.get("ratio_16_64x") is not None]
             for name, c in onset["cells"].items()}
    cells = {name: h for name, h in cells.items() if h}
    if not cells:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    # 20 distinct colors (tab20: 10 dark, then their 10 light twins), then dashed lines: a 5 x 5 grid has 25 cells
    colors = plt.get_cmap("tab20").colors
    for i, (name, history) in enumerate(sorted(cells.items())):
        steps = np.array([h["step"] for h in history])
        ratio = np.array([h["ratio_16_64x"] for h in history], dtype=float)
        line, = ax.plot(steps, ratio, marker="o", markersize=3, label=name, color=colors[2 * (i % 10) + (i // 10) % 2],
                        linestyle="--" if (i // 20) % 2 else "-")
        lo = np.array([h.get("ratio_16_64x_lo") if h.get("ratio_16_64x_lo") is not None else np.nan for h in history],
                      dtype=float)
        hi = np.array([h.get("ratio_16_64x_hi") if h.get("ratio_16_64x_hi") is not None else np.nan for h in history],
                      dtype=float)
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        failing = np.array([h.get("forgets") is False for h in history])
        if failing.any():
            ax.plot(steps[failing], ratio[failing], "s", color=line.get_color(), markersize=7)
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle=":", label="flat (ratio 1)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss mean[16T, 64T] / mean[T/2, T]")
    ax.set_title("Beyond-window loss along training (band: bootstrap 95% over rows; squares: fails the 2x test)",
                 fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_figures(out: str, results: list[dict], rows: list[dict], fits: dict, tensorboard: bool) -> None:
    figures = {"t_forget_vs_state_size": plot_t_forget(rows, fits)}
    if results:  # a provisional cell has no final curve
        figures["loss_curves"] = plot_curve_grid(results, rows)
    pk = plot_passkey_grid(results, rows)
    if pk is not None:
        figures["passkey_heatmaps"] = pk
    writer = None
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        folder = os.path.join(out, "summary")
        for old in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
            os.unlink(old)  # a summary replaces the previous one
        writer = SummaryWriter(folder)
        for r in rows:  # x axis: N_S in thousands, so TensorBoard draws T_forget vs N_S
            if "n_s" not in r:
                continue
            step = int(round(r["n_s"] / 1000))
            if r["t_forget"] is not None:
                writer.add_scalar("study/t_forget", r["t_forget"], step)
            if r["t_forget_lower_bound"] is not None:
                writer.add_scalar("study/t_forget_lower_bound", r["t_forget_lower_bound"], step)
            if r["t_recall"] is not None:
                writer.add_scalar("study/t_recall", r["t_recall"], step)
        writer.add_text("study/summary", "\n".join(markdown_table(rows)), 0)
    for name, fig in figures.items():
        if writer is not None:
            writer.add_figure(f"study/{name}", fig, 0, close=False)
        plots.save_png(fig, os.path.join(out, f"{name}.png"))
    if writer is not None:
        writer.close()


def markdown_table(rows: list[dict]) -> list[str]:
    """One line per row; with seeds its T_forget is the majority's, each seed's beside it, and a LEN reads
    ``32: fails 2/3`` (seeds failing / seeds finished). A provisional verdict (a cell's last evaluation along
    training) reads ``32:FAILS (provisional, step 7,101)``; the T_forget text names those it rests on."""
    lines = ["| row | N_S (M) | N_S SSM-only (M) | T_forget | forgets per LEN |", "|---|---|---|---|---|"]
    for r in rows:
        ns = f"{r['n_s'] / N_S_UNIT:.3f}" if "n_s" in r else "-"
        ssm = f"{r['n_s_ssm_only'] / N_S_UNIT:.3f}" if "n_s" in r else "-"
        t_forget = r["t_forget_text"]
        if "seeds" in r:
            t_forget += " (" + ", ".join(f"seed {e['seed']}: {e['t_forget_text']}" for e in r["t_forget_per_seed"]) + ")"
            passes = "; ".join(f"{t}: {seed_counts_text(r['fails_per_len'][t])}" for t in r["passes"])
        else:
            early = r.get("provisional") or {}
            passes = " ".join(f"{t}:{VERDICT_WORDS[p]}" + (f" (provisional, step {early[t]['step']:,})"
                                                           if t in early else "") for t, p in r["passes"].items())
        lines.append(f"| {r['row']} | {ns} | {ssm} | {t_forget} | {passes} |")
    return lines


def seed_counts_text(counts: dict) -> str:
    """``fails 2/3``, then what keeps the count from being the whole story: undetermined, provisional (counted
    from their last evaluation along training) or unfinished seeds."""
    early = counts.get("provisional", 0)
    extra = [f"{n} {what}" for n, what in ((counts["undetermined"], "undetermined"), (early, "provisional"),
                                           (counts["planned"] - counts["finished"] - early, "missing")) if n]
    return f"fails {counts['fails']}/{counts['finished'] + early}" + (f" ({', '.join(extra)})" if extra else "")


def summary_lines(summary: dict) -> list[str]:
    """What the command prints: the table, the fits with the paper's numbers beside ours, the notes."""
    lines = markdown_table(summary["rows"])
    for law, paper_text in (("t_forget", f"paper: a = {PAPER_T_FORGET['a']}, b = {PAPER_T_FORGET['b']}"),
                            ("t_recall", f"paper: a = {PAPER_T_RECALL['a']}, b = {PAPER_T_RECALL['b']}, "
                                         f"c = {PAPER_T_RECALL['c']}")):
        entry = summary["fits"][law]
        form = "T_forget = a N_S + b" if law == "t_forget" else "T_recall = b (a^N_S - 1) + c"
        fit = entry.get("paper_convention", entry)
        if fit.get("fit") is None:
            lines.append(f"{form}: {fit['reason']}  ({paper_text})")
            continue
        f = fit["fit"]
        ours = ", ".join(f"{k} = {f[k]:.4g}" for k in ("a", "b", "c") if k in f)
        r2 = "n/a" if f["r2"] is None else f"{f['r2']:.4f}"
        early = (f", provisional: T_forget of {', '.join(fit['provisional_rows'])} from evaluations along training"
                 if fit.get("provisional") else "")
        lines.append(f"{form} (N_S in M, T in K tokens): ours {ours}, R^2 = {r2} over {fit['n_points']} points"
                     f"{early}  ({paper_text})")
    lines += onset_lines(summary.get("onset") or {"cells": {}, "t_forget_by_step": {}})
    lines += [f"note: {n}" for n in summary["notes"]]
    lines.append(f"written to {summary['out']} (results.csv, summary.json, *.png, summary/)")
    return lines
