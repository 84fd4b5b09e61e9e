"""One states x LEN map from several studies' summaries: slices of one study that ran in separate folders, machines
or device sessions, whose cell folders need not be at hand (a summary.json keeps every cell's evaluations along
training, ``onset.cells``).

    lightning-mamba sweep --out runs/study/map --map_summaries '[runs/study/a/summary.json, runs/study/b/summary.json]'

writes ``grid_map.png`` (as a study's own, over all their cells) and ``grid_map.json`` (the numbers drawn, and the
summaries read). Each summary's cells count as runs of their own, so a cell trained again in a later slice adds a
run; leave out a summary whose cells another one repeats (e.g. a merged folder's and its slices').
"""

from __future__ import annotations

import json
import os

from ..analysis import plots
from .onset import grid_map
from .summary_plots import plot_grid_map
from .sweep import SweepError, write_json

CELL_KEYS = ("row", "seq_len", "history")  # what grid_map reads of a cell


def _cells_of(path: str) -> dict[str, dict]:
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
                         "a summary.json that `lightning-mamba sweep` wrote")
    return cells


def map_of_summaries(paths: list[str]) -> dict[str, dict[str, dict]]:
    """study.onset.grid_map over the cells of every summary in ``paths`` (a cell per summary and name)."""
    if not paths:
        raise SweepError("--map_summaries got no files: give a list like '[runs/study/a/summary.json, "
                         "runs/study/b/summary.json]'")
    cells = {}
    for path in paths:
        cells.update({f"{path}:{name}": cell for name, cell in _cells_of(path).items()})
    return grid_map(cells)


def write_summary_map(paths: list[str], out: str) -> list[str]:
    """grid_map.png and grid_map.json in ``out``; the lines to print."""
    grid = map_of_summaries(paths)
    runs = sum(entry["runs"] for row in grid.values() for entry in row.values())
    figure = plot_grid_map(grid)
    if figure is None:
        raise SweepError(f"the {len(paths)} summaries hold no evaluated cell: nothing to draw")
    png, data = os.path.join(out, "grid_map.png"), os.path.join(out, "grid_map.json")
    plots.save_png(figure, png)
    write_json(data, {"summaries": [os.path.normpath(p) for p in paths], "runs": runs, "grid": grid})
    return [f"map of {runs} evaluated run(s) from {len(paths)} summaries: {png}, {data}"]
