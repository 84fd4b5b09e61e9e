import numpy as np
from matplotlib.figure import Figure

from lightning_mamba.analysis import plots


def test_figures_and_png(tmp_path):
    pos = np.arange(16, 1025, 16)
    figs = [
        plots.plot_loss_curve(pos, 3 + np.log(pos) / 10, 64, threshold_line=6.0),
        plots.plot_state_norm(pos, np.random.rand(len(pos), 2, 4) + 0.1, 64),
        plots.plot_state_norm(pos, np.random.rand(len(pos), 2, 4) + 0.1, 64, per_head=True),
        plots.plot_retention_heatmap(np.random.rand(2, 4), 64),
        plots.plot_log_retention(pos, -np.random.rand(len(pos), 2, 4), 64),
    ]
    assert all(isinstance(f, Figure) for f in figs)
    for i, f in enumerate(figs):
        path = plots.save_png(f, str(tmp_path / "sub" / f"{i}.png"))
        assert open(path, "rb").read(4) == b"\x89PNG"
