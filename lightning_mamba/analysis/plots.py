"""Matplotlib figures (Agg, no display) for TensorBoard's ``add_figure`` and for PNG files.

The package's one choice of matplotlib backend: every module that draws takes pyplot from here
(``from ..analysis.plots import plt``), so Agg is selected before pyplot is first imported."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: figures go to PNG files and TensorBoard
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colors, ticker  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ..atomic import atomic_write  # noqa: E402


def contrast_ratio(rgb_a, rgb_b) -> float:
    """WCAG contrast ratio of two colours (1: the same, 21: black on white; 4.5 reads as body text)."""
    def luminance(rgb):
        c = np.asarray(colors.to_rgb(rgb), dtype=float)
        c = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        return float(c @ [0.2126, 0.7152, 0.0722])

    hi, lo = sorted((luminance(rgb_a), luminance(rgb_b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def text_color_on(background) -> str:
    """Black or white, whichever reads better on ``background`` (at least 4.5:1 for any background)."""
    return "black" if contrast_ratio("black", background) >= contrast_ratio("white", background) else "white"


def _tokens(x: float, _pos=None) -> str:
    """1024 -> 1K, 1048576 -> 1M (powers of two read best for lengths)."""
    for div, unit in ((2**20, "M"), (2**10, "K")):
        if x >= div:
            return f"{x / div:g}{unit}"
    return f"{x:g}"


def _log_positions(ax) -> None:
    """Log-x axis with ticks at powers of two labelled 512, 1K, 2K, ..."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(ticker.LogLocator(base=2, numticks=12))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(_tokens))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def _mark_train_len(ax, seq_len: int) -> None:
    ax.axvline(seq_len, color="k", linestyle="--", linewidth=1, label=f"T_train = {seq_len}")


def threshold_label(value: float, factor: float | None = None) -> str:
    """Legend text of the criterion's failure line: ``2 x max bucket loss within T_train = 4.12``."""
    if factor is None:
        return f"failure threshold = {value:.3g}"
    return f"failure threshold: {factor:g} x max bucket loss within T_train = {value:.3g}"


def plot_loss_curve(positions, curve, seq_len: int, threshold_line: float | None = None, title: str = "",
                    threshold_factor: float | None = None) -> Figure:
    """Bucket-averaged loss vs position (log x) with T_train marked; ``threshold_line`` is the criterion's failure
    line (``threshold_factor`` x the max bucket loss within T_train), labelled with its factor when given."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(positions, curve, marker=".", linewidth=1.2, label="loss (bucket mean)")
    if threshold_line is not None and np.isfinite(threshold_line):
        ax.axhline(threshold_line, color="r", linestyle=":", linewidth=1,
                   label=threshold_label(threshold_line, threshold_factor))
    return _finish_loss_plot(fig, ax, seq_len, "next-token loss", title, legend_size=8)


def _finish_loss_plot(fig: Figure, ax, seq_len: int, ylabel: str, title: str, legend_size: int) -> Figure:
    """T_train marked, log-x positions, labels, legend: the common part of the loss-vs-position figures."""
    _mark_train_len(ax, seq_len)
    _log_positions(ax)
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "loss vs position")
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    return fig


DENSE_CURVE = 256  # buckets beyond which the figure draws the curve thin, with a log-binned mean over it


def plot_forgetting_report(report, threshold: float, title: str) -> Figure:
    """The loss-vs-position figure of a forgetting report (analysis/forgetting.py), its 2x line drawn. A long
    horizon at a small T_train has thousands of buckets (32K tokens in buckets of 16: 2,048), a solid band on a log
    axis: then the buckets (what the criterion judges) are drawn thin and a mean over ~48 log-spaced bins over them,
    so the trend far out stays readable."""
    v = report.verdict
    fig = plot_loss_curve(report.positions, report.curve, report.seq_len, threshold * v.max_in_window,
                          threshold_factor=threshold, title=title)
    if report.curve.size > DENSE_CURVE:
        ax = fig.axes[0]
        ax.lines[0].set(marker="", linewidth=0.5, alpha=0.5)  # the bucket curve: plot_loss_curve draws it first
        n, bucket = report.per_position.size, report.bucket
        ends = np.unique(np.append(np.round(np.geomspace(1, n / bucket, 48)).astype(int) * bucket, n))  # whole buckets
        ends = ends[ends <= n]
        starts = np.concatenate([[0], ends[:-1]])
        ax.plot(ends, [report.per_position[a:e].mean() for a, e in zip(starts, ends)], color="C1", linewidth=1.6,
                label="mean over log-spaced bins")
        ax.legend(fontsize=8)
    return fig


def plot_state_norm(positions, rms, seq_len: int, per_head: bool = False, title: str = "") -> Figure:
    """State RMS vs position, one line per layer (max over heads), or one per (layer, head) if ``per_head``.

    ``rms`` is (S, layers, heads)."""
    rms = np.asarray(rms)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    cmap = plt.get_cmap("viridis")
    n_layer = rms.shape[1]
    for layer in range(n_layer):
        color = cmap(layer / max(1, n_layer - 1))
        if per_head:
            for h in range(rms.shape[2]):
                ax.plot(positions, rms[:, layer, h], color=color, linewidth=0.8, alpha=0.6,
                        label=f"layer {layer}" if h == 0 else None)
        else:
            ax.plot(positions, rms[:, layer].max(-1), color=color, linewidth=1.2, label=f"layer {layer}")
    _mark_train_len(ax, seq_len)
    _log_positions(ax)
    if (np.isfinite(rms) & (rms > 0)).any():  # a diverged model's states are NaN: nothing to scale
        ax.set_yscale("log")
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("state RMS" + ("" if per_head else " (max over heads)"))
    ax.set_title(title or "state norm vs position")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


RETENTION_DEFINITION = (r"$\alpha_{1:T}=\alpha_2\alpha_3\cdots\alpha_T$, $\alpha_j=\exp(\Delta_j A_h)$ (T = T_train):"
                        "\nthe share of token 1 still in the state at T")
TINY = np.finfo(np.float64).tiny  # retention that underflowed to 0 is drawn at log10 of this (and marked "<")


def _log10_label(v: float, floored: bool) -> str:
    """-0.0043, -0.43, -5.3, -123 (and "<-307" where the retention underflowed to 0)."""
    text = f"{v:.2g}" if abs(v) < 0.1 else f"{v:.1f}" if abs(v) < 10 else f"{v:.0f}"
    return ("<" if floored else "") + text


def plot_retention_heatmap(retention, seq_len: int, title: str = "", log_retention=None,
                           annotate_max_cells: int = 100) -> Figure:
    """Layer x head heatmap of the first token's retention over T_train, alpha_(1:T), in log10 (0 = kept whole,
    -6 = a millionth left): on a linear 0-1 scale a trained model's 1e-6 is indistinguishable from 0.

    ``log_retention`` (natural log, (L, H)) takes precedence over ``retention`` (linear, may have underflowed to 0).
    The colour bar spans the data (whole decades) and each cell carries its value when there are few cells."""
    if log_retention is not None:
        lg = np.asarray(log_retention, dtype=np.float64) / np.log(10)
        floored = np.zeros(lg.shape, dtype=bool)
    else:
        r = np.asarray(retention, dtype=np.float64)
        floored = r < TINY
        lg = np.log10(np.maximum(r, TINY))
    finite = lg[np.isfinite(lg) & ~floored]
    hi = float(np.ceil(finite.max())) if finite.size else 0.0
    lo = float(np.floor(finite.min())) if finite.size else -1.0
    lo = min(lo, hi - 1.0)
    annotate = lg.size <= annotate_max_cells
    cell = 0.5 if annotate else 0.3
    fig, ax = plt.subplots(figsize=(max(4.8, cell * lg.shape[1] + 2.6), max(3.0, cell * lg.shape[0] + 1.9)))
    norm = colors.Normalize(vmin=lo, vmax=hi)
    cmap = plt.get_cmap("magma").with_extremes(bad="0.6")  # grey: underflowed to 0, below any log10 scale
    im = ax.imshow(np.where(floored, np.nan, lg), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    if annotate:
        for (i, j), v in np.ndenumerate(lg):
            ax.text(j, i, _log10_label(v, bool(floored[i, j])), ha="center", va="center", fontsize=7,
                    color=text_color_on("0.6" if floored[i, j] else cmap(norm(v))))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    head = title or f"first-token retention over T_train = {seq_len}"
    ax.set_title(f"{head}\n{RETENTION_DEFINITION}", fontsize=8)
    bar = fig.colorbar(im, ax=ax)
    bar.set_label(r"$\log_{10}\alpha_{1:T}$  (0: kept whole, $-k$: $10^{-k}$ left)"
                  + ("; grey: underflowed to 0" if floored.any() else ""), fontsize=8)
    fig.tight_layout()
    return fig


def plot_log_retention(positions, log_retention, seq_len: int, title: str = "") -> Figure:
    """log10 first-token retention R_t vs position, one line per layer (the head that forgets least)."""
    lr = np.asarray(log_retention) / np.log(10)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    cmap = plt.get_cmap("viridis")
    for layer in range(lr.shape[1]):
        ax.plot(positions, lr[:, layer].max(-1), color=cmap(layer / max(1, lr.shape[1] - 1)), label=f"layer {layer}")
    _mark_train_len(ax, seq_len)
    _log_positions(ax)
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("log10 R_t (max over heads)")
    ax.set_title(title or "first-token retention")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def save_png(fig: Figure, path: str, close: bool = True) -> str:
    """The figure as a PNG at ``path``, written atomically (a reader never sees half a file)."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    if close:
        plt.close(fig)
    return path


def close(fig: Figure) -> None:
    plt.close(fig)


STYLES = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "v"), ((0, (5, 1, 1, 1)), "D"), ((0, (1, 3)), "x")]


def group_equal_curves(curves: dict, rtol: float = 1e-6, atol: float = 1e-9) -> list[list[str]]:
    """Labels of ``curves`` ({label: (positions, curve)}) grouped where the curves are the same (same positions,
    values within the tolerance), in their first label's order."""
    groups: list[list[str]] = []
    for label, (pos, y) in curves.items():
        for g in groups:
            p0, y0 = curves[g[0]]
            if (np.shape(p0) == np.shape(pos) and np.array_equal(p0, pos)
                    and np.allclose(y0, y, rtol=rtol, atol=atol, equal_nan=True)):
                g.append(label)
                break
        else:
            groups.append([label])
    return groups


def plot_loss_curves(curves: dict, seq_len: int, title: str = "") -> Figure:
    """Several bucket-averaged loss curves ({label: (positions, curve)}) on one log-x axis, T_train marked.

    Curves that are the same are drawn once, their labels joined in one legend entry ("all equal" when every one
    is); the others get their own line style and staggered markers, and a lower panel draws each one's difference
    from the first curve, so curves closer than a line's width still tell apart."""
    groups = group_equal_curves(curves)
    diff = len(groups) > 1
    if diff:
        fig, (ax, dax) = plt.subplots(2, 1, figsize=(7, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    else:
        fig, ax = plt.subplots(figsize=(7, 4.2))
    ref_pos, ref = (np.asarray(a, dtype=float) for a in curves[groups[0][0]])
    for i, group in enumerate(groups):
        pos, y = (np.asarray(a, dtype=float) for a in curves[group[0]])
        if len(groups) == 1 and len(group) > 1:
            label = "all equal: " + ", ".join(group)
        elif len(group) > 1:
            label = " = ".join(group) + " (equal)"
        else:
            label = group[0]
        ls, marker = STYLES[i % len(STYLES)]
        every = max(1, len(pos) // 12)
        style = dict(color=f"C{i}", linestyle=ls, marker=marker, markersize=4, linewidth=1.2,
                     markevery=(min(i * max(1, every // len(groups)), len(pos) - 1), every) if len(pos) else None)
        ax.plot(pos, y, label=label, **style)
        if diff and i > 0 and np.array_equal(pos, ref_pos):
            dax.plot(pos, y - ref, **style)
    if diff:
        dax.axhline(0.0, color="C0", linestyle="-", linewidth=1.2)
        dax.set_ylabel(f"loss − {_short(groups[0][0])}", fontsize=8)
        dax.tick_params(labelsize=8)
        _mark_train_len(dax, seq_len)
        dax.set_xlabel("position (tokens)")
    fig = _finish_loss_plot(fig, ax, seq_len, "next-token loss (bucket mean)", title, legend_size=7)
    if diff:
        ax.set_xlabel("")
    return fig


def _short(label: str, width: int = 24) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"
