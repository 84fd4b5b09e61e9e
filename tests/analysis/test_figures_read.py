"""The figures carry their information: retention on a log scale, a readable passkey heatmap, curves that do not
hide each other, a labelled failure line, legends only for what is drawn, units that suit the numbers."""

import numpy as np
import pytest

from lightning_mamba.analysis import plots
from lightning_mamba.analysis.passkey import PasskeyGrid, plot_passkey_heatmap


def cell_colors(fig):
    im = fig.axes[0].images[0]
    return im.cmap(im.norm(im.get_array()))  # (rows, cols, 4)


def texts(ax):
    return [t.get_text() for t in ax.texts]


# ---- (a) the retention heatmap --------------------------------------------------------------------------------
def test_retention_of_a_millionth_is_not_drawn_as_zero():
    """Retention ~1e-6 .. 1e-4 (a trained model at LEN 2048): on a linear 0-1 bar every cell was black."""
    retention = np.array([[1e-6, 1e-4], [3e-5, 2e-6]])
    fig = plots.plot_retention_heatmap(retention, 2048)
    rgba = cell_colors(fig)
    assert np.abs(rgba[0, 0, :3] - rgba[0, 1, :3]).max() > 0.3  # 1e-6 and 1e-4 look different
    data = np.asarray(fig.axes[0].images[0].get_array())
    np.testing.assert_allclose(data, np.log10(retention))  # log10 alpha is what is drawn
    bar = fig.axes[1]
    assert "log_{10}" in bar.get_ylabel() and "alpha_{1:T}" in bar.get_ylabel()
    title = fig.axes[0].get_title()
    assert "T_train = 2048" in title and r"\alpha_{1:T}" in title and "share of token 1" in title
    assert texts(fig.axes[0]) == ["-6.0", "-4.0", "-4.5", "-5.7"]  # few cells: each one's value in it
    plots.close(fig)


def test_retention_heatmap_takes_log_retention_and_marks_underflow():
    log_r = np.log(np.array([[1e-3, 1e-9]]))
    fig = plots.plot_retention_heatmap(None, 64, log_retention=log_r)
    np.testing.assert_allclose(np.asarray(fig.axes[0].images[0].get_array()), [[-3.0, -9.0]])
    plots.close(fig)
    fig = plots.plot_retention_heatmap(np.array([[0.0, 1e-3, 1e-2]]), 64)  # exp() underflowed to 0
    image = fig.axes[0].images[0]
    assert image.norm.vmin == -3 and image.norm.vmax == -2  # the underflowed cell does not squash the others
    assert texts(fig.axes[0])[0].startswith("<") and "underflowed" in fig.axes[1].get_ylabel()
    plots.close(fig)


def test_every_cell_label_reads_on_its_colour():
    rng = np.random.default_rng(0)
    fig = plots.plot_retention_heatmap(10 ** rng.uniform(-9, 0, (3, 8)), 64)
    rgba = cell_colors(fig)
    for t in fig.axes[0].texts:
        col, row = (int(round(c)) for c in t.get_position())
        assert plots.contrast_ratio(t.get_color(), rgba[row, col]) >= 4.5
    plots.close(fig)


# ---- (b) the passkey heatmap ----------------------------------------------------------------------------------
def grid(correct):
    correct = np.asarray(correct, dtype=bool)
    return PasskeyGrid([256, 512, 1024], [0.25, 0.75], correct, correct.astype(float))


@pytest.mark.parametrize("hits", [0, 2, 4])
def test_passkey_heatmap_is_readable_whatever_the_accuracy(hits):
    """All wrong was a solid dark red with black numbers on it; now every number reads on its cell."""
    correct = np.zeros((2, 3, 4), dtype=bool)
    correct[..., :hits] = True
    fig = plot_passkey_heatmap(grid(correct), seq_len=512)
    ax = fig.axes[0]
    rgba = cell_colors(fig)
    assert len(ax.texts) == 6
    for t in ax.texts:
        col, row = (int(round(c)) for c in t.get_position())
        assert t.get_text() == {0: "0", 2: "0.50", 4: "1"}[hits]
        assert plots.contrast_ratio(t.get_color(), rgba[row, col]) >= 4.5
        assert t.get_fontsize() >= 8
    assert [t.get_text() for t in ax.get_xticklabels()] == ["256", "512", "1K"]
    assert all(t.get_rotation() == 0 and t.get_fontsize() >= 8 for t in ax.get_xticklabels())
    assert "accuracy" in fig.axes[1].get_ylabel()  # a labelled 0-1 colour bar
    assert fig.axes[0].images[0].norm.vmin == 0 and fig.axes[0].images[0].norm.vmax == 1
    assert "4 prompts per cell" in ax.get_title() and "T_train = 512" in ax.get_xlabel()
    plots.close(fig)


# ---- (c) several loss curves on one axis ----------------------------------------------------------------------
def legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_identical_curves_say_so_in_the_legend():
    pos = np.arange(16, 1025, 16)
    y = 2 + np.sin(pos / 50)
    fig = plots.plot_loss_curves({"as trained": (pos, y), "RRI (none)": (pos, y.copy()), "window": (pos, y + 0)},
                                 64)
    assert len(fig.axes) == 1 and len(fig.axes[0].lines) == 2  # one curve (+ the T_train line)
    assert legend_texts(fig.axes[0])[0] == "all equal: as trained, RRI (none), window"
    plots.close(fig)


def test_near_identical_curves_are_told_apart():
    """Curves 1e-3 apart (the fixes on a tiny model) drew as one line: now each has its own style and markers,
    equal ones share an entry, and a lower panel draws each one's difference from the first."""
    pos = np.arange(16, 1025, 16)
    y = 2 + np.sin(pos / 50)
    curves = {"as trained": (pos, y), "RRI": (pos, y + 1e-3), "dt": (pos, y - 2e-3), "same": (pos, y.copy())}
    fig = plots.plot_loss_curves(curves, 64)
    ax, dax = fig.axes
    assert legend_texts(ax)[:3] == ["as trained = same (equal)", "RRI", "dt"]
    lines = ax.lines[:3]
    assert len({(str(line.get_linestyle()), line.get_marker()) for line in lines}) == 3
    diffs = [line.get_ydata() for line in dax.lines if len(line.get_ydata()) == len(pos)]
    assert any(np.allclose(d, 1e-3) for d in diffs) and any(np.allclose(d, -2e-3) for d in diffs)
    assert "as trained" in dax.get_ylabel()
    plots.close(fig)


# ---- (e) the failure line is named ----------------------------------------------------------------------------
def test_the_failure_line_says_what_it_is():
    pos = np.arange(16, 1025, 16)
    fig = plots.plot_loss_curve(pos, 3 + 0 * pos, 64, threshold_line=6.0, threshold_factor=2.0)
    assert "failure threshold: 2 x max bucket loss within T_train = 6" in legend_texts(fig.axes[0])
    plots.close(fig)
    fig = plots.plot_loss_curve(pos, 3 + 0 * pos, 64, threshold_line=6.0)  # callers that do not pass the factor
    assert "failure threshold = 6" in legend_texts(fig.axes[0])
    plots.close(fig)
