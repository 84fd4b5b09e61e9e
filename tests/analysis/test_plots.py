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


def test_the_backend_is_chosen_in_plots_only():
    """Only analysis/plots.py selects the backend and imports pyplot; every other module that draws takes ``plt``
    from it, so Agg is in place whichever of them is imported first."""
    import pathlib
    import re

    import lightning_mamba

    root = pathlib.Path(lightning_mamba.__file__).parent
    pattern = re.compile(r"^\s*(import matplotlib\.pyplot|from matplotlib import pyplot|matplotlib\.use\()", re.M)
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name != "plots.py" and pattern.search(p.read_text())]
    assert offenders == []
    assert len(pattern.findall((root / "analysis" / "plots.py").read_text())) == 2  # use("Agg"), then pyplot
