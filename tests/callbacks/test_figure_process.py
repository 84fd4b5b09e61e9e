"""callbacks/figure_process.py: a figure drawn in the drawing process reaches TensorBoard as the same PNG that
``add_figure`` writes, at its step; a recipe that does not pickle is drawn in the training process."""

import os
from functools import partial

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from lightning_mamba.analysis import plots
from lightning_mamba.callbacks import figure_process
from lightning_mamba.callbacks.figure_process import FigureQueue

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RMS = np.random.default_rng(0).random((64, 2, 4)) + 0.5
POSITIONS = np.arange(1, 65) * 16


def _images(folder, tag):
    acc = EventAccumulator(str(folder), size_guidance={"images": 0})
    acc.Reload()
    return [(e.step, e.width, e.height, e.encoded_image_string) for e in acc.Images(tag)]


def test_a_figure_drawn_apart_is_add_figures_png(tmp_path):
    recipe = partial(plots.plot_state_norm, POSITIONS, RMS, 32, title="state RMS")
    apart, here = SummaryWriter(str(tmp_path / "apart")), SummaryWriter(str(tmp_path / "here"))
    queue = FigureQueue()
    queue.submit(recipe, "state/norm_vs_position", 7, [apart])
    assert len(queue._pending) == 1 and figure_process._pool is not None  # in flight, in the drawing process
    queue.collect(wait=True)
    assert not queue._pending
    fig = recipe()
    here.add_figure("state/norm_vs_position", fig, global_step=7)
    apart.close(), here.close()
    got, want = _images(tmp_path / "apart", "state/norm_vs_position"), _images(tmp_path / "here", "state/norm_vs_position")
    assert len(got) == 1 and got == want and got[0][0] == 7 and got[0][1] > 100


def test_a_recipe_that_does_not_pickle_is_drawn_here(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    queue = FigureQueue()
    queue.submit(lambda: plots.plot_state_norm(POSITIONS, RMS, 32), "state/norm", 3, [writer])
    queue.collect(wait=True)
    writer.close()
    assert [step for step, *_ in _images(tmp_path, "state/norm")] == [3]


def test_an_unguarded_script_is_not_run_again_by_the_drawing_process(tmp_path):
    """multiprocessing's spawn runs the parent's __main__ script again in the child: a training script without an
    ``if __name__ == "__main__"`` guard would train twice. The drawing process starts under a bare __main__."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(
        "from functools import partial\n"
        "import numpy as np\n"
        "from torch.utils.tensorboard import SummaryWriter\n"
        "from lightning_mamba.analysis import plots\n"
        "from lightning_mamba.callbacks import figure_process\n"
        "print('top level ran', flush=True)\n"
        f"writer = SummaryWriter({str(tmp_path / 'tb')!r})\n"
        "queue = figure_process.FigureQueue()\n"
        "queue.submit(partial(plots.plot_state_norm, np.arange(1, 9), np.ones((8, 1, 2)), 4), 'x', 1, [writer])\n"
        "assert figure_process._pool is not None\n"
        "queue.collect(wait=True)\n"
        "writer.close()\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("top level ran") == 1
    assert [step for step, *_ in _images(tmp_path / "tb", "x")] == [1]
