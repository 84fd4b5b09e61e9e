"""The study's figures: a legend entry only for what is drawn, T_forget in units that suit the numbers, the
failure line of the curve grid named, the passkey grid on a labelled 0-1 scale."""

import numpy as np
import pytest

from lightning_mamba.analysis import plots
from lightning_mamba.study.summary import fits_of, rows_of
from lightning_mamba.study.summary_plots import plot_curve_grid, plot_passkey_grid, plot_t_forget
from tests.study.test_sweep import fake_result


def result(row, n_s, t, forgets, passkey=None):
    r = fake_result(row, t, forgets, n_s)
    if passkey is not None:
        r["passkey"] = passkey
    return r


def labels(ax):
    legend = ax.get_legend()
    return [] if legend is None else [t.get_text() for t in legend.get_texts()]


def test_the_cpu_study_draws_bounds_in_tokens_and_no_measured_entry():
    """make sweep-cpu: both rows already forget at LEN 32. The figure showed 'T_forget (measured)' without a point
    and a y axis at 0.03 K tokens."""
    results = [result(f"state{d}", n_s, t, True) for d, n_s in ((8, 1500), (16, 2620)) for t in (32, 64)]
    rows = rows_of(results, None)
    fig = plot_t_forget(rows, fits_of(rows))
    ax = fig.axes[0]
    assert labels(ax) == ["<= min LEN (upper bound: the shortest LEN forgets)"]
    assert "(tokens)" in ax.get_ylabel() and "thousands" in ax.get_xlabel()
    drawn = [line for line in ax.lines if len(line.get_xdata())]
    assert len(drawn) == 1
    np.testing.assert_allclose(drawn[0].get_ydata(), [32, 32])
    np.testing.assert_allclose(drawn[0].get_xdata(), [1.5, 2.62])
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] > 32
    assert any("no fit" in t.get_text() for t in ax.texts)  # why there is no line
    plots.close(fig)


def test_measured_points_and_the_fit_in_k_tokens_and_millions():
    results = []
    for row, n_s, first in (("a", 0.2e6, 2048), ("b", 0.6e6, 4096), ("c", 1.0e6, 8192)):
        results += [result(row, n_s, t, t >= first) for t in (1024, 2048, 4096, 8192)]
    rows = rows_of(results, None)
    fits = fits_of(rows)
    fig = plot_t_forget(rows, fits)
    ax = fig.axes[0]
    assert labels(ax)[0].startswith("T_forget lies in (longest LEN that fails")  # the grid's interval
    assert labels(ax)[1] == "T_forget (measured)" and labels(ax)[2].startswith("fit ")
    assert len(labels(ax)) == 3  # no bound was drawn, so none is in the legend
    assert "K tokens" in ax.get_ylabel() and "millions" in ax.get_xlabel()
    measured, fit = ax.lines[:2]
    np.testing.assert_allclose(measured.get_ydata(), [2, 4, 8])
    f = fits["t_forget"]["paper_convention"]["fit"]  # the fit line is drawn in the axes' units
    np.testing.assert_allclose(fit.get_ydata(), f["a"] * np.asarray(fit.get_xdata()) + f["b"], rtol=1e-9)
    plots.close(fig)


def test_the_curve_grid_names_its_lines_and_only_those_drawn():
    results = [result("state8", 1500, 32, True), result("state8", 1500, 64, False)]
    fig = plot_curve_grid(results, rows_of(results, None))
    names = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "failure threshold: 2 x max bucket loss within LEN" in names and "LEN (T_train)" in names
    assert "loss, cell FAILS to forget" in names and "loss, cell forgets" in names
    plots.close(fig)
    results = [result("state8", 1500, 32, True)]
    fig = plot_curve_grid(results, rows_of(results, None))
    assert "loss, cell FAILS to forget" not in [t.get_text() for t in fig.legends[0].get_texts()]
    plots.close(fig)


def test_a_one_len_grid_keeps_its_legend_inside_the_figure():
    """A study with one finished cell drew a two-column legend wider than its one-cell figure: cut off at the left."""
    results = [result("state64", 1500, 128, True)]
    fig = plot_curve_grid(results, rows_of(results, None))
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    figure = fig.bbox
    assert legend.x0 >= figure.x0 and legend.x1 <= figure.x1
    plots.close(fig)


@pytest.mark.parametrize("accuracy", [[[0.0, 0.0], [0.0, 0.0]], [[1.0, 0.5], [1.0, 0.0]]])
def test_the_passkey_grid_reads(accuracy):
    pk = {"lengths": [1024, 2048], "depths": [0.25, 0.75], "accuracy": accuracy, "t_recall": None}
    results = [result("state8", 1500, 1024, True, pk)]
    fig = plot_passkey_grid(results, rows_of(results, None))
    ax, bar = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1K", "2K"]
    assert "accuracy" in bar.get_ylabel()
    im = ax.images[0]
    assert (im.norm.vmin, im.norm.vmax) == (0, 1)
    rgba = im.cmap(im.norm(im.get_array()))
    for t in ax.texts:
        col, row = (int(round(c)) for c in t.get_position())
        assert plots.contrast_ratio(t.get_color(), rgba[row, col]) >= 4.5
    assert len(ax.texts) == 4
    plots.close(fig)


def test_two_measured_states_an_exact_line_and_each_t_forget_as_the_grids_interval():
    """Two finite T_forgets (the regime study's fourth and fifth slices): the line passes through both, so no R^2 is
    claimed; each T_forget is drawn with the interval the LEN grid leaves, (longest failing LEN, T_forget]; the
    legend sits below the axes, where it cannot cover a point."""
    results = []
    for row, n_s, first in (("state512", 1.067e6, 64), ("state1024", 2.128e6, 128), ("state256", 0.537e6, 16)):
        results += [result(row, n_s, t, t >= first) for t in (16, 32, 64, 128) if t >= 16]
    rows = rows_of(results, None)
    by_row = {r["row"]: r for r in rows}
    assert (by_row["state512"]["t_forget"], by_row["state512"]["t_forget_after"]) == (64, 32)
    assert (by_row["state1024"]["t_forget"], by_row["state1024"]["t_forget_after"]) == (128, 64)
    assert by_row["state256"]["t_forget"] is None and by_row["state256"]["t_forget_after"] is None  # a bound only
    fits = fits_of(rows)
    entry = fits["t_forget"]["paper_convention"]
    assert entry["n_points"] == 2 and entry["fit"]["r2"] is None and "no R^2" in entry["note"]
    assert entry["fit"]["a"] == pytest.approx((128 - 64) / 1024 / (2.128 - 1.067))
    fig = plot_t_forget(rows, fits)
    ax = fig.axes[0]
    (fit_label,) = [t for t in labels(ax) if t.startswith("fit ")]
    assert "2 points: no R^2" in fit_label and "R^2 1" not in fit_label
    (bars,) = ax.collections[:1]
    segments = sorted(tuple(map(tuple, s)) for s in bars.get_segments())
    assert segments == [((1.067, 32.0), (1.067, 64.0)), ((2.128, 64.0), (2.128, 128.0))]
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert legend.y1 <= ax.get_window_extent().y0  # below the axes
    assert legend.y0 >= 0  # and still inside the figure
    plots.close(fig)


def test_three_points_keep_their_r2():
    results = []
    for row, n_s, first in (("a", 0.2e6, 2048), ("b", 0.6e6, 4096), ("c", 1.0e6, 8192)):
        results += [result(row, n_s, t, t >= first) for t in (1024, 2048, 4096, 8192)]
    entry = fits_of(rows_of(results, None))["t_forget"]["paper_convention"]
    assert entry["n_points"] == 3 and isinstance(entry["fit"]["r2"], float) and "note" not in entry
