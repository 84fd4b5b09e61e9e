"""A study's summary from its cells' result.json files: T_forget per state size, the paper's laws fitted, figures.

``summarize(out)`` reads ``<out>/cells/*/result.json`` (and the plan in ``<out>/study.json`` when there) and writes
``results.csv`` (one row per cell), ``summary.json`` (per row of the grid: N_S both ways, passes per LEN,
T_forget or a lower bound; the fits beside the paper's constants), PNG figures and a TensorBoard run
``<out>/summary``. It can run at any time, e.g. after every shard has finished; a row with cells still missing
is reported as incomplete rather than guessed, unless the missing cell has evaluations along training
(``cells/<cell>/lengthgen/step_N.json``, a cell stopped early under a time budget): then its last evaluation gives a
provisional verdict (:func:`.provisional_results`), used for T_forget like a final one but marked as such everywhere
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

from ..analysis import plots
from ..analysis.criterion import VERDICT_WORDS, verdict_word
from ..analysis.fits import N_S_UNIT, PAPER_T_FORGET, PAPER_T_RECALL, T_UNIT, fit_exponential, fit_linear
from ..atomic import atomic_write_text, remove_stale_temporaries_in
from ..data.cache import STALE_TEMPORARY_SECONDS
from .cell_records import write_cell_records
from .onset import onset_summary
from .provisional import provisional_mark, provisional_note, provisional_results, provisional_text
from .summary_plots import (
    N_S_UNITS,
    axis_unit,
    plot_curve_grid,
    plot_decays,
    plot_grid_map,
    plot_onset,
    plot_passkey_grid,
    plot_t_forget,
)
from .sweep import SweepError, clean, parse_cell_name, seed_of, state_of_row, write_json
from .t_forget import lens_deciding, t_forget_of

# seed: the seed_everything the cell trained with (result.json has it for every cell, replicate or not)
CSV_FIELDS = ("cell", "row", "d_state", "n_layer", "d_model", "seq_len", "seed", "batch_size", "steps", "tokens", "params",
              "n_s", "n_s_ssm_only", "forgets", "blowup_position", "blowup_over_len", "max_in_window",
              "ratio_4_16x", "ratio_16_64x", "ratio_16_64x_lo", "ratio_16_64x_hi", "ratio_far", "ratio_far_lo",
              "ratio_far_hi", "evaluated_to", "val_loss", "t_recall", "train_seconds",
              "train_seconds_all_runs", "eval_seconds")
FAR_KEYS = ("ratio_far", "ratio_far_lo", "ratio_far_hi")  # result.json's metrics (none in a result from before them)
MODEL_KEYS = ("d_state", "n_layer", "d_model", "n_s", "n_s_ssm_only", "params")  # the model a row names (rows_of)


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


def t_forget_text(entry: dict, why_incomplete: str = "", provisional: str = "") -> str:
    """``64``, ``> 128``, ``<= 32`` or ``incomplete (missing LEN 64)``; ``provisional`` (:func:`.provisional_text`)
    is added in parentheses: ``64 (provisional: LEN 32 at step 7,101, LEN 64 at step 10,501 of 20,000)``."""
    if entry["t_forget"] is None and not entry["t_forget_lower_bound"] and not entry["t_forget_upper_bound"]:
        why = "; ".join(filter(None, (why_incomplete, provisional)))
        return "incomplete" + (f" ({why})" if why else "")
    text = (str(entry["t_forget"]) if entry["t_forget"] is not None else
            f"> {entry['t_forget_lower_bound']}" if entry["t_forget_lower_bound"] else
            f"<= {entry['t_forget_upper_bound']}")
    return text + (f" ({provisional})" if provisional else "")


def rows_of(results: list[dict], plan: dict | None, provisional: list[dict] | None = None) -> list[dict]:
    """One entry per row of the grid (a state size, by size; or a model, in plan order): T_forget = the shortest LEN that
    forgets above the longest one that fails (:func:`t_forget_of`).
    A cell whose verdict is undetermined (``forgets`` None: a non-finite loss) counts as missing, as one without a
    result does; ``undetermined_lens`` names those LENs. With seeds, a LEN's verdict is its seeds' majority
    (:func:`majority_verdict`): undecided after all its seeds finished it is undetermined, before that missing; a
    seeded row also gets ``seeds``, ``fails_per_len`` (counts per LEN) and ``t_forget_per_seed``.

    ``provisional`` (:func:`.provisional_results`): verdicts of cells without a result.json, from their last
    evaluation along training, counted like final ones; a final result of the same cell wins. A row that uses one
    gets ``provisional`` (LEN -> :func:`.provisional_mark` of its cell; with seeds, a list of its seeds' marks) and
    ``t_forget_provisional`` (whether T_forget, or its bound, rests on one), and its ``t_forget_text`` names them;
    a row without any keeps the keys it always had."""
    planned: dict[str, dict[int, list]] = {}  # row -> LEN -> the planned runs' seeds (None: no seeds)
    for row, t, seed in filter(None, map(parse_cell_name, (plan or {}).get("cells", []))):
        planned.setdefault(row, {}).setdefault(t, []).append(seed)
    done = {r["cell"] for r in results}
    runs_all = [*results, *(p for p in provisional or [] if p["cell"] not in done)]  # a final result wins
    order = list(dict.fromkeys([*planned, *(r["row"] for r in runs_all)]))
    if all(state_of_row(name) is not None for name in order):  # the states axis by state size, whatever order
        order.sort(key=state_of_row)  # slices or merged folders planned them in
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
        # a cell whose passkey lengths were all shorter than the template records passkey: null (sweep.passkey_cell)
        if any("passkey" in r and r["passkey"] is None for rs in runs.values() for r in rs):
            entry["passkey_skipped"] = True  # only then: a row's keys stay those of earlier summaries otherwise
        rows.append(entry)
    return rows


def fit_entry(fit, n: int, paper: dict, min_points: int, provisional_rows: list[str] = ()) -> dict:
    """The fit (or why none), its points and the paper's constants; ``provisional: true`` and ``provisional_rows``
    when some of its points are provisional T_forgets (from evaluations along training, not final results).

    A fit with as many points as parameters passes through all of them: its R^2 (1 by construction) says nothing
    about the law, so it is None there, with a ``note`` saying why."""
    mark = {"provisional": True, "provisional_rows": list(provisional_rows)} if provisional_rows else {}
    if fit is None:
        return {"fit": None, "n_points": n, "reason": f"no fit: {n} finite point(s), needs at least {min_points} "
                "with different N_S", "paper": paper, **mark}
    entry = {"fit": fit._asdict(), "n_points": n, "paper": paper, **mark}
    if n <= min_points:
        entry["fit"]["r2"] = None
        entry["note"] = f"{n} points for {min_points} parameters: the curve passes through every point, no R^2"
    return entry


def fits_of(rows: list[dict], passkey_planned: bool = False) -> dict:
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
        if any(r.get("passkey_skipped") for r in rows):
            reason = ("passkey did not run: every passkey length (passkey_multiples x LEN) was shorter than the "
                      "passkey template; raise passkey_multiples")
        elif passkey_planned:
            reason = "passkey did not run yet: no finished cell has its passkey grid"
        else:
            reason = "passkey did not run (study.passkey: false)"
        out["t_recall"] = {"fit": None, "reason": reason, "paper": PAPER_T_RECALL}
    return out


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


RECORD_FOLDERS = ("lengthgen", "state_stats", "dynamics", "val", "passkey")  # a cell's records along training


def summarize(out: str, tensorboard: bool = True) -> dict:
    """Write results.csv, summary.json, PNGs and (optionally) the TensorBoard run ``<out>/summary``."""
    plan = load_plan(out)
    results = load_results(out)
    if plan is None and not results:
        raise SweepError(f"no study under {out}: neither study.json nor cells/*/result.json (wrong --out?)")
    cells = cells_of(plan, results, out)
    # the temporary files of writes killed mid-way (a summary's figures and tables, a cell's result.json or records):
    # nothing else removes them. A margin of age, since a folder shared between machines may hold a live writer's.
    for folder in [out, *(os.path.join(out, "cells", name, sub) for name in cells for sub in ("", *RECORD_FOLDERS))]:
        remove_stale_temporaries_in(folder, STALE_TEMPORARY_SECONDS)
    onset = onset_summary(os.path.join(out, "cells"), cells, (plan or {}).get("tokens_per_batch"))
    for name, (_, seq_len) in cells.items():  # along_training.png, decays.csv: the cells' own records, per cell
        if os.path.isdir(os.path.join(out, "cells", name)):
            write_cell_records(os.path.join(out, "cells", name), seq_len)
    early = provisional_results(plan, results, onset, out)
    rows = rows_of(results, plan, early)
    order = {r["row"]: i for i, r in enumerate(rows)}
    results.sort(key=lambda r: (order[r["row"]], r["seq_len"], seed_of(r["cell"]) or 0))
    fits = fits_of(rows, bool((plan or {}).get("passkey")))
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
    along = summary["onset"]  # every cell's evaluations along training
    along_figures = {name: figure for name, figure in (("onset", plot_onset(along)), ("decays", plot_decays(along)),
                                                       ("grid_map", plot_grid_map(along["grid"]))) if figure is not None}
    write_json(os.path.join(out, "summary.json"), summary)
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=CSV_FIELDS)
    w.writeheader()
    w.writerows(clean([csv_row(r) for r in results]))
    atomic_write_text(os.path.join(out, "results.csv"), table.getvalue())
    if results or early:
        write_figures(out, results, rows, fits, tensorboard, along_figures)
    else:
        for name, figure in along_figures.items():
            plots.save_png(figure, os.path.join(out, f"{name}.png"))
    return summary


def write_figures(out: str, results: list[dict], rows: list[dict], fits: dict, tensorboard: bool,
                  along_figures: dict | None = None) -> None:
    """The summary's PNGs and, with ``tensorboard``, the run ``<out>/summary`` (scalars, table and every figure,
    ``along_figures`` (onset, decays, grid map: the cells' records along training) among them)."""
    figures = {"t_forget_vs_state_size": plot_t_forget(rows, fits)}
    if results:  # a provisional cell has no final curve
        figures["loss_curves"] = plot_curve_grid(results, rows)
    pk = plot_passkey_grid(results, rows)
    if pk is not None:
        figures["passkey_heatmaps"] = pk
    figures.update(along_figures or {})
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
            for bound in ("t_forget_lower_bound", "t_forget_upper_bound"):  # "> max LEN", "<= min LEN"
                if r.get(bound) is not None:
                    writer.add_scalar(f"study/{bound}", r[bound], step)
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
    # N_S in the unit the plots use (millions, or thousands for the CPU's miniature models, which read 0.000 M)
    scale, unit = axis_unit([r["n_s"] for r in rows if "n_s" in r], N_S_UNITS)
    lines = [f"| row | N_S ({unit}) | N_S SSM-only ({unit}) | T_forget | forgets per LEN |", "|---|---|---|---|---|"]
    for r in rows:
        ns = f"{r['n_s'] / scale:.3f}" if "n_s" in r else "-"
        ssm = f"{r['n_s_ssm_only'] / scale:.3f}" if "n_s" in r else "-"
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
        r2 = f"n/a ({fit['note']})" if "note" in fit else "n/a" if f["r2"] is None else f"{f['r2']:.4f}"
        early = (f", provisional: T_forget of {', '.join(fit['provisional_rows'])} from evaluations along training"
                 if fit.get("provisional") else "")
        lines.append(f"{form} (N_S in M, T in K tokens): ours {ours}, R^2 = {r2} over {fit['n_points']} points"
                     f"{early}  ({paper_text})")
    lines += onset_lines(summary.get("onset") or {"cells": {}, "t_forget_by_step": {}})
    lines += [f"note: {n}" for n in summary["notes"]]
    lines.append(f"written to {summary['out']} (results.csv, summary.json, *.png, summary/; per cell "
                 "cells/<cell>/along_training.png, decays.csv where their records exist)")
    return lines
