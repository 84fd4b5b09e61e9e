"""One states x LEN map from several studies' summaries: slices of one study that ran in separate folders, machines
or device sessions, whose cell folders need not be at hand (a summary.json keeps every cell's evaluations along
training, ``onset.cells``).

    lightning-mamba sweep --out runs/study/map --map_summaries '[runs/study/a/summary.json, runs/study/b/summary.json]'

writes ``grid_map.png`` (as a study's own, over all their cells) and ``grid_map.json`` (the numbers drawn, and the
summaries read). Each summary's cells count as runs of their own, so a cell trained again in a later slice adds a
run; leave out a summary whose cells another one repeats (e.g. a merged folder's and its slices').

It also reads T_forget seed by seed over all the slices (``t_forget_per_seed`` in the JSON,
``t_forget_per_seed.png``) and fits the paper's line T_forget = a N_S + b to the seeds' measured points (``fits``).
Slices ran for unequal budgets, so a seed's verdicts need not be monotone in LEN (a short budget at one LEN, a long
one at the next). The reading is the sweep summary's (:func:`.t_forget.t_forget_of`), which rests on the failures, the
positive evidence: T_forget of a seed is the shortest LEN that forgets above the longest LEN that fails (a lower
bound while no longer LEN has been run; an upper bound, the shortest LEN, when none fails), and ``forgets_below``
names LENs under a failing one that stayed flat. Only
evaluations that reached ``min_evaluated_to`` tokens count (early slices evaluated to 64 x LEN only, too short to
see a failure far out); a run's verdict is its last such evaluation, from the summary where it went furthest.
"""

from __future__ import annotations

import json
import os

from ..analysis import plots
from ..analysis.fits import N_S_UNIT, PAPER_T_FORGET, T_UNIT, fit_linear
from .onset import grid_map
from .summary import fit_entry, t_forget_text
from .summary_plots import plot_grid_map, plot_t_forget
from .sweep import SweepError, write_json
from .t_forget import t_forget_of

CELL_KEYS = ("row", "seq_len", "history")  # what grid_map reads of a cell
ROW_KEYS = ("d_state", "n_s", "n_s_ssm_only")  # what the fit reads of a row


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            summary = json.load(f)
    except OSError as e:
        raise SweepError(f"cannot read {path} ({e.strerror}): give summary.json files that `lightning-mamba sweep` "
                         "wrote") from None
    except ValueError as e:
        raise SweepError(f"{path} is not valid JSON ({e}): restore it or leave it out") from None
    cells = summary.get("onset", {}).get("cells") if isinstance(summary, dict) else None
    if not isinstance(cells, dict) or not all(isinstance(c, dict) and all(k in c for k in CELL_KEYS)
                                              for c in cells.values()):
        raise SweepError(f"{path} has no evaluations along training (onset.cells with {', '.join(CELL_KEYS)}): give "
                         "the summary.json of a study whose cells evaluate during training (as configs/study/"
                         "regime.yaml's do; older sweeps and final-only studies have none)")
    return summary


def _summaries(paths: list[str]) -> dict[str, dict]:
    if not paths:
        raise SweepError("--map_summaries got no files: give a list like '[runs/study/a/summary.json, "
                         "runs/study/b/summary.json]'")
    return {path: _read(path) for path in paths}


def _grid(summaries: dict[str, dict]) -> dict[str, dict[str, dict]]:
    return grid_map({f"{path}:{name}": cell for path, summary in summaries.items()
                     for name, cell in summary["onset"]["cells"].items()})


def map_of_summaries(paths: list[str]) -> dict[str, dict[str, dict]]:
    """study.onset.grid_map over the cells of every summary in ``paths`` (a cell per summary and name)."""
    return _grid(_summaries(paths))


def last_verdicts(summaries: dict[str, dict], min_evaluated_to: int) -> dict[tuple[str, int, int], dict]:
    """(row, seed, LEN) -> the run's last evaluation that reached ``min_evaluated_to`` tokens and gave a verdict,
    taken from the summary whose evaluations of that run went furthest. A cell named without a seed ran with the
    study's seed (0 unless a summary says ``seed``)."""
    out: dict[tuple[str, int, int], dict] = {}
    for path, summary in summaries.items():
        for name, cell in summary["onset"]["cells"].items():
            seed = cell.get("seed", summary.get("seed") or 0)
            counted = [h for h in cell["history"] if h.get("forgets") is not None and h.get("step") is not None
                       and (h.get("evaluated_to") or 0) >= min_evaluated_to]
            if not counted:
                continue
            last = counted[-1]
            key = (cell["row"], int(seed), int(cell["seq_len"]))
            if key not in out or last["step"] > out[key]["step"]:
                out[key] = {"forgets": last["forgets"], "step": last["step"], "ratio": last.get("ratio_16_64x"),
                            "summary": os.path.normpath(path), "cell": name}
    return out


def t_forget_per_seed(summaries: dict[str, dict], min_evaluated_to: int) -> list[dict]:
    """Per (row, seed): its verdicts by LEN (forgets, step, ratio, where from) and T_forget read from them, with the
    row's state size where some summary gives it."""
    rows = {r["row"]: {k: r[k] for k in ROW_KEYS if k in r} for summary in summaries.values()
            for r in summary.get("rows") or [] if isinstance(r, dict) and "row" in r}
    runs = last_verdicts(summaries, min_evaluated_to)
    out = []
    for row, seed in sorted({(r, s) for r, s, _ in runs}, key=lambda rs: (rows.get(rs[0], {}).get("n_s", 0), rs)):
        lens = {t: v for (r, s, t), v in sorted(runs.items()) if (r, s) == (row, seed)}
        out.append({"row": row, "seed": seed, **rows.get(row, {}),
                    **t_forget_of(sorted(lens), {t: v["forgets"] for t, v in lens.items()}),
                    "lens": {str(t): v for t, v in lens.items()}})
    return out


def fits_per_seed(entries: list[dict]) -> dict:
    """The paper's line fitted to the seeds' measured T_forgets (K tokens vs N_S in M), both N_S conventions."""
    measured = [e for e in entries if e["t_forget"] is not None and "n_s" in e]
    y = [e["t_forget"] / T_UNIT for e in measured]
    out = {"units": {"n_s": "millions (1e6)", "t": f"K tokens (1K = {T_UNIT})"}, "t_forget": {}}
    for key, label in (("n_s", "paper_convention"), ("n_s_ssm_only", "ssm_only")):
        out["t_forget"][label] = fit_entry(fit_linear([e[key] / N_S_UNIT for e in measured], y), len(measured),
                                           PAPER_T_FORGET, 2)
    return out


SEED_BOUNDS = {"t_forget_lower_bound": "> the longest LEN that fails (no longer LEN run)",
               "t_forget_upper_bound": "<= the shortest LEN run (none fails)"}
MARKS = (("t_forget", "="), ("t_forget_lower_bound", ">"), ("t_forget_upper_bound", "<="))


def _figure_rows(entries: list[dict]) -> list[dict]:
    """The seeds as rows of plot_t_forget: one point per state size, value and kind, named once per place with its
    seeds (``state1024 s1 =, s2 <=``: measured for seed 1, an upper bound for seed 2)."""
    points: dict[tuple, dict] = {}
    for e in entries:
        kind = next((k for k, _ in MARKS if e.get(k) is not None), None)
        if "n_s" not in e or kind is None:
            continue
        points.setdefault((e["n_s"], e[kind], kind), {**e, "seeds": []})["seeds"].append(e["seed"])
    names: dict[tuple, list[str]] = {}
    for (n_s, value, kind), p in points.items():
        names.setdefault((n_s, value), []).append(f"s{','.join(map(str, p['seeds']))} {dict(MARKS)[kind]}")
    out, named = [], set()
    for (n_s, value, _kind), p in points.items():
        label = "" if (n_s, value) in named else f"{p['row']} " + ", ".join(names[(n_s, value)])
        named.add((n_s, value))
        out.append({**p, "row": label})
    return out


def _seed_line(e: dict) -> str:
    t = t_forget_text(e)  # a seed here always has a verdict at some LEN, so never "incomplete"
    verdicts = ", ".join(f"{n}: {'forgets' if v['forgets'] else 'FAILS'} ({v['step']})" for n, v in e["lens"].items())
    return f"  {e['row']} seed {e['seed']}: T_forget {t}   [LEN: verdict (step) {verdicts}]"


def _fit_line(entry: dict) -> str:
    f = entry["fit"]
    if f is None:
        return f"  fit over the seeds' measured T_forget: {entry['reason']}"
    line = (f"  fit over the seeds' measured T_forget: T_forget = {f['a']:.3g} N_S {f['b']:+.3g} "
            "(N_S in M, T in K tokens)")
    return line + (f", {entry['n_points']} points, R^2 {f['r2']:.3f}" if f["r2"] is not None else f", {entry['note']}")


def write_summary_map(paths: list[str], out: str, min_evaluated_to: int = 32768) -> list[str]:
    """grid_map.png, grid_map.json and t_forget_per_seed.png in ``out``; the lines to print."""
    summaries = _summaries(paths)
    grid = _grid(summaries)
    runs = sum(entry["runs"] for row in grid.values() for entry in row.values())
    figure = plot_grid_map(grid)
    if figure is None:
        raise SweepError(f"the {len(paths)} summaries hold no cell evaluated to 64 x LEN (the map draws the ratio "
                         f"mean[16T,64T] / mean[T/2,T]): give summaries of studies with eval_multiple 64")
    png, data = os.path.join(out, "grid_map.png"), os.path.join(out, "grid_map.json")
    plots.save_png(figure, png)
    seeds = t_forget_per_seed(summaries, min_evaluated_to)
    fits = fits_per_seed(seeds)
    lines = [f"map of {runs} evaluated run(s) from {len(paths)} summaries: {png}, {data}"]
    if not seeds:  # every evaluation under the floor: the fit's "0 finite point(s)" alone read as no verdict at all
        furthest = max((h.get("evaluated_to") or 0 for summary in summaries.values()
                        for cell in summary["onset"]["cells"].values() for h in cell["history"]), default=0)
        lines.append(f"T_forget seed by seed: no evaluation reached {min_evaluated_to} tokens (the furthest: "
                     f"{furthest}): give a lower --map_min_evaluated_to to read these runs' verdicts")
    shown = _figure_rows(seeds)
    if shown:
        seeds_png = os.path.join(out, "t_forget_per_seed.png")
        plots.save_png(plot_t_forget(shown, fits, SEED_BOUNDS), seeds_png)
        lines.append(f"T_forget seed by seed (evaluations to >= {min_evaluated_to} tokens): {seeds_png}")
    write_json(data, {"summaries": [os.path.normpath(p) for p in paths], "runs": runs, "grid": grid,
                      "min_evaluated_to": min_evaluated_to, "t_forget_per_seed": seeds, "fits": fits})
    return lines + [_seed_line(e) for e in seeds] + [_fit_line(fits["t_forget"]["paper_convention"])]
