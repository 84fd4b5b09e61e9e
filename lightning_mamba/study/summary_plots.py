"""The summary's figures: T_forget vs N_S, every cell's loss curve, the passkey heatmaps and the beyond-window
loss ratio along training; :func:`.summary.summarize` saves them as PNGs (and, but for the last, in its TensorBoard
run)."""

from __future__ import annotations

import re

import numpy as np

from ..analysis import plots
from ..analysis.criterion import VERDICT_WORDS
from ..analysis.fits import N_S_UNIT, PAPER_T_FORGET, T_UNIT
from ..analysis.plots import plt
from .sweep import seed_of

T_UNITS = ((T_UNIT**2, "M tokens, 1M = 2^20"), (T_UNIT, f"K tokens, 1K = {T_UNIT}"), (1, "tokens"))
N_S_UNITS = ((1e9, "billions"), (N_S_UNIT, "millions"), (1e3, "thousands"), (1, "entries"))


def axis_unit(values, units) -> tuple[float, str]:
    """(scale, name) of the largest of ``units`` (descending) in which the largest value is at least 1, so an axis
    reads 32 tokens or 0.8 millions rather than 0.03 K tokens or 0.0016 millions."""
    top = max((abs(v) for v in values), default=0)
    return next(((scale, name) for scale, name in units if top >= scale), units[-1])


BOUND_LABELS = {"t_forget_lower_bound": "> max LEN (lower bound: the longest LEN fails)",
                "t_forget_upper_bound": "<= min LEN (upper bound: the shortest LEN forgets)"}


def plot_t_forget(rows: list[dict], fits: dict, bound_labels: dict[str, str] | None = None) -> plt.Figure:
    """T_forget vs N_S: measured points, lower and upper bounds and the linear fit, each in the legend only when
    drawn; both axes in the unit that suits the numbers (tokens below 1K, thousands of state entries below 1M). A
    provisional point (resting on a cell's last evaluation along training) is drawn hollow. ``bound_labels``
    replaces the legend's words for the bounds (BOUND_LABELS), for bounds read another way."""
    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    placed = [r for r in rows if "n_s" in r]
    words = {**BOUND_LABELS, **(bound_labels or {})}
    kinds = (("t_forget", "o", "C0", "T_forget (measured)"),
             ("t_forget_lower_bound", "^", "C3", words["t_forget_lower_bound"]),
             ("t_forget_upper_bound", "v", "C2", words["t_forget_upper_bound"]))
    points = {key: [r for r in placed if r[key] is not None] for key, *_ in kinds}
    # with seeds: each seed's measured T_forget, small, beside the majority's
    per_seed = [(r["n_s"], e["t_forget"]) for r in placed for e in r.get("t_forget_per_seed", [])
                if e["t_forget"] is not None]
    x_scale, x_name = axis_unit([r["n_s"] for r in placed], N_S_UNITS)
    t_scale, t_name = axis_unit([r[key] for key, rs in points.items() for r in rs] + [t for _, t in per_seed],
                                T_UNITS)
    measured = points["t_forget"]
    if any(r.get("t_forget_after") for r in measured):  # the grid's step: each T_forget lies in (after, t_forget]
        ax.vlines([r["n_s"] / x_scale for r in measured], [(r.get("t_forget_after") or r["t_forget"]) / t_scale
                  for r in measured], [r["t_forget"] / t_scale for r in measured], color="C0", alpha=0.35, lw=3,
                  label="T_forget lies in (longest LEN that fails, shortest that forgets]")
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
                label=f"fit {f['a']:.3g} N_S {f['b']:+.3g} (N_S in M, T in K; "
                      + (f"R^2 {f['r2']:.3f})" if f["r2"] is not None else f"{entry['n_points']} points: no R^2)"))
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
    if ax.get_legend_handles_labels()[0]:  # below the axes: its long labels would cover points inside them
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
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


def cell_style(i: int) -> dict:
    """The i-th cell's line: 20 distinct colors (tab20: 10 dark, then their 10 light twins), then dashed lines (a 5 x 5
    grid has 25 cells); the same cell gets the same line in every figure of a study (cells in name order)."""
    return {"color": plt.get_cmap("tab20").colors[2 * (i % 10) + (i // 10) % 2],
            "linestyle": "--" if (i // 20) % 2 else "-"}


def along_training(fig: plt.Figure, ax, ylabel: str, title: str) -> plt.Figure:
    """The axes of a figure along training: optimizer steps, a small title, the cells' legend."""
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_decays(onset: dict, threshold: float = 0.99) -> plt.Figure | None:
    """Per cell, the slowest head's alpha over T (the share of its state that survives T_train tokens) at every
    evaluation along training, on a scale of nines (0.9, 0.99, 0.999: -log10(1 - alpha)); squares where the
    evaluation fails the 2x test. The paper's mechanism (claim 4): a head that stops forgetting climbs past 0.99 as
    the beyond-window loss rises. None without any decay record."""
    cells = {name: [h for h in c["history"] if h.get("decay_alpha_T_max") is not None]
             for name, c in onset["cells"].items()}
    if not any(cells.values()):
        return None
    nines = lambda a: -np.log10(np.clip(1.0 - np.asarray(a, dtype=float), 1e-12, None))  # noqa: E731
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, history) in enumerate(sorted(cells.items())):  # every cell's index: its color in onset.png too
        if not history:
            continue
        steps = np.array([h["step"] for h in history])
        y = nines([h["decay_alpha_T_max"] for h in history])
        line, = ax.plot(steps, y, marker="o", markersize=3, label=name, **cell_style(i))
        failing = np.array([h.get("forgets") is False for h in history])
        if failing.any():
            ax.plot(steps[failing], y[failing], "s", color=line.get_color(), markersize=7)
    ax.axhline(float(nines(threshold)), color="gray", linewidth=0.8, linestyle=":", label=f"alpha over T = {threshold}")
    top = max(3.0, float(np.ceil(ax.get_ylim()[1])))
    ticks = np.arange(0, top + 1)
    ax.set_yticks(ticks, ["0" if t == 0 else "0." + "9" * int(t) for t in ticks])
    ax.set_ylim(0, top)
    return along_training(fig, ax, "slowest head's alpha over T (scale of nines)",
                          "Retention over T_train of each cell's slowest head along training (squares: fails the 2x test)")


def plot_onset(onset: dict) -> plt.Figure | None:
    """Per cell, the ratio mean[16T,64T] / mean[T/2,T] at every evaluation along training, with its bootstrap 95%
    interval; filled markers where the evaluation fails the 2x criterion. None without any ratio."""
    cells = {name: [h for h in c["history"] if h.get("ratio_16_64x") is not None]
             for name, c in onset["cells"].items()}
    if not any(cells.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, history) in enumerate(sorted(cells.items())):  # every cell's index: its color in decays.png too
        if not history:
            continue
        steps = np.array([h["step"] for h in history])
        ratio = np.array([h["ratio_16_64x"] for h in history], dtype=float)
        line, = ax.plot(steps, ratio, marker="o", markersize=3, label=name, **cell_style(i))
        lo = np.array([h.get("ratio_16_64x_lo") if h.get("ratio_16_64x_lo") is not None else np.nan for h in history],
                      dtype=float)
        hi = np.array([h.get("ratio_16_64x_hi") if h.get("ratio_16_64x_hi") is not None else np.nan for h in history],
                      dtype=float)
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        failing = np.array([h.get("forgets") is False for h in history])
        if failing.any():
            ax.plot(steps[failing], ratio[failing], "s", color=line.get_color(), markersize=7)
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle=":", label="flat (ratio 1)")
    return along_training(fig, ax, "loss mean[16T, 64T] / mean[T/2, T]",
                          "Beyond-window loss along training (band: bootstrap 95% over rows; squares: fails the 2x test)")


def _natural(name: str) -> tuple:
    """state64 before state512: the number in a row's name compares as a number."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _steps_text(entry: dict) -> str:
    """'\n3.5K steps' or '\n1.4-6.1K steps' (the runs' last evaluations), '\n40 steps' or '\n40-60 steps' under
    1K (a miniature run read 0.0K); '' when unknown."""
    lo, hi = entry.get("steps_min"), entry.get("steps_max")
    if lo is None:
        return ""
    k = (lambda s: f"{s / 1000:.1f}") if hi >= 1000 else str  # noqa: E731
    unit = "K steps" if hi >= 1000 else " steps"
    return f"\n{k(lo)}{unit}" if k(lo) == k(hi) else f"\n{k(lo)}-{k(hi)}{unit}"


def plot_grid_map(grid: dict[str, dict[str, dict]]) -> plt.Figure | None:
    """The grid as a map (rows: states or models, columns: LEN): color, the highest ratio mean[16T,64T] /
    mean[T/2,T] along training (over seeds: a rise that recovered still shows); text, the ratio at the end and the
    runs failing the 2x test at the end / ever / evaluated (in the evaluations along training). None for an empty
    grid (onset's ``grid``)."""
    if not grid:
        return None
    rows = sorted(grid, key=_natural)
    lens = sorted({int(t) for row in grid.values() for t in row})
    peak = np.full((len(rows), len(lens)), np.nan)
    fig, ax = plt.subplots(figsize=(1.3 * len(lens) + 2.6, 0.75 * len(rows) + 1.8))
    for i, row in enumerate(rows):
        for j, t in enumerate(lens):
            entry = grid[row].get(str(t))
            if entry is None:
                continue
            peak[i, j] = entry["ratio_peak"]
            ax.text(j, i, f"peak {entry['ratio_peak']:.2f}\nend {entry['ratio_end']:.2f}\nfail "
                    f"{entry['fail_at_end']}/{entry['failed_ever']}/{entry['runs']}{_steps_text(entry)}",
                    ha="center", va="center", fontsize=7)
    image = ax.imshow(np.ma.masked_invalid(peak), cmap="coolwarm", vmin=0.6, vmax=1.4, aspect="auto")
    fig.colorbar(image, ax=ax, label="highest ratio along training")
    ax.set_xticks(range(len(lens)), [str(t) for t in lens])
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("LEN (T_train)")
    ax.set_title("Beyond-window ratio mean[16T,64T] / mean[T/2,T] per cell\n(fail: runs failing the 2x test at the "
                 "end / ever / evaluated; steps at the last evaluation)", fontsize=8)
    fig.tight_layout()
    return fig
