"""What `analyze` and `mitigate` draw, on a tiny model: the failure line named, retention in log10 with its
definition, log-retention curves in TensorBoard, mitigation curves that do not hide each other."""

import json

import numpy as np
import pytest

from lightning_mamba.analysis import plots
from lightning_mamba.commands import analyze, mitigate


@pytest.fixture
def drawn(monkeypatch):
    """{file name: (legend texts, titles, colour-bar labels, image arrays)} of every PNG a command saves."""
    seen = {}
    save = plots.save_png

    def record(fig, path, close=True):
        legends = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        seen[path.rsplit("/", 1)[-1]] = {
            "legend": legends, "titles": [ax.get_title() for ax in fig.axes],
            "ylabels": [ax.get_ylabel() for ax in fig.axes],
            "images": [np.asarray(im.get_array()) for ax in fig.axes for im in ax.images], "axes": len(fig.axes)}
        return save(fig, path, close)

    monkeypatch.setattr(plots, "save_png", record)
    return seen




def test_analyze_figures_say_what_they_show(checkpoint, tmp_path, drawn):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path, text = checkpoint
    out = tmp_path / "out"
    assert analyze.main(["--ckpt", str(path), "--seq_len", "16", "--text", str(text), "--length", "256",
                         "--n_rows", "2", "--out", str(out), "--tensorboard"]) == 0
    loss = drawn["loss_vs_position.png"]
    assert any(t.startswith("failure threshold: 2 x max bucket loss within T_train = ") for t in loss["legend"])
    stats = json.loads((out / "state_stats.json").read_text())
    for probe in ("text", "newlines"):
        heat = drawn[f"retention_heatmap_{probe}.png"]
        log_r = np.asarray(stats[probe]["stats"]["log_retention_T"])
        np.testing.assert_allclose(heat["images"][0], log_r / np.log(10), rtol=1e-6)  # log10 alpha_(1:T)
        assert "T_train = 16" in heat["titles"][0] and "share of token 1" in heat["titles"][0]
        assert "log_{10}" in heat["ylabels"][1]
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert {"analysis/log_retention_text", "analysis/log_retention_newlines",
            "analysis/retention_heatmap_text"} <= set(acc.Tags()["images"])


def test_mitigate_figure_shows_every_method(checkpoint, tmp_path, drawn):
    """The fixes move a tiny model's loss by ~1e-3: their curves drew on top of each other. Now a lower panel draws
    each one's difference from the model as trained, and a checkpoint equal to it shares its legend entry."""
    path, text = checkpoint
    assert mitigate.main(["--ckpt", str(path), "--seq_len", "16", "--text", str(text), "--length", "256",
                          "--n_rows", "2", "--out", str(tmp_path / "m"), "--methods", "[rri, window]",
                          "--compare", json.dumps({"same weights": str(path)})]) == 0
    fig = drawn["loss_vs_position.png"]
    assert fig["legend"][0] == "as trained = same weights (equal)"
    assert any(t.startswith("RRI") for t in fig["legend"]) and any(t.startswith("sliding window") for t in fig["legend"])
    assert fig["axes"] == 2 and "as trained" in fig["ylabels"][1]

