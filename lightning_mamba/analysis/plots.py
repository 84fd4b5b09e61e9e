"""Matplotlib figures (Agg, no display) for TensorBoard's ``add_figure`` and for PNG files.

The package's one choice of matplotlib backend: every module that draws takes pyplot from here
(``from ..analysis.plots import plt``), so Agg is selected before pyplot is first imported."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # headless: figures go to PNG files and TensorBoard
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


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


def plot_loss_curve(positions, curve, seq_len: int, threshold_line: float | None = None, title: str = "") -> Figure:
    """Bucket-averaged loss vs position (log x) with T_train marked; ``threshold_line`` e.g. 2 x max in window."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(positions, curve, marker=".", linewidth=1.2, label="loss (bucket mean)")
    if threshold_line is not None and np.isfinite(threshold_line):
        ax.axhline(threshold_line, color="r", linestyle=":", linewidth=1, label="failure threshold")
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
    ax.set_yscale("log")
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("state RMS" + ("" if per_head else " (max over heads)"))
    ax.set_title(title or "state norm vs position")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_retention_heatmap(retention, seq_len: int, title: str = "") -> Figure:
    """Layer x head heatmap of the first token's retention over T_train, alpha_{1:T_train} (0 = forgotten)."""
    r = np.asarray(retention)
    fig, ax = plt.subplots(figsize=(max(3.5, 0.35 * r.shape[1] + 2), max(2.5, 0.3 * r.shape[0] + 1.5)))
    im = ax.imshow(r, aspect="auto", cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_title(title or f"retention alpha_(1:{seq_len})")
    fig.colorbar(im, ax=ax)
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    if close:
        plt.close(fig)
    return path


def close(fig: Figure) -> None:
    plt.close(fig)


def plot_loss_curves(curves: dict, seq_len: int, title: str = "") -> Figure:
    """Several bucket-averaged loss curves ({label: (positions, curve)}) on one log-x axis, T_train marked."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, (positions, curve) in curves.items():
        ax.plot(positions, curve, linewidth=1.2, label=label)
    return _finish_loss_plot(fig, ax, seq_len, "next-token loss (bucket mean)", title, legend_size=7)
