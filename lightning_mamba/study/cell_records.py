"""Per cell, from its run folder, beside the study's summary: the loss against position at a few of its evaluations
along training (``along_training.png``) and the decays of its heads along training (``decays.csv``, one row per
``dynamics/step_N.json``: A, mean dt, the slowest head's alpha over T and the count above the threshold). What the
results of a failing cell are read from, written by ``sweep`` itself rather than by a script of one's own."""

from __future__ import annotations

import csv
import io
import os

from ..analysis import plots
from ..analysis.decays import decay_stats
from ..atomic import atomic_write_text
from .onset import read_steps

DECAY_FIELDS = ["step", "A_max", "A_median", "dt_mean_median", "alpha_T_max", "alpha_T_median", "heads_alpha_T_above",
                "threshold"]


def decay_rows(cell_folder: str) -> list[dict]:
    """One row per DecayDynamicsCallback record, in step order (``analysis.decays.decay_stats``)."""
    rows = []
    for step, record in sorted(read_steps(os.path.join(cell_folder, "dynamics")).items()):
        d = decay_stats(record)
        if d is None:  # a record of another shape: skipped, as a file that does not parse
            continue
        rows.append({"step": step, "A_max": f"{d['A_max']:.4g}", "A_median": f"{d['A_median']:.4g}",
                     "dt_mean_median": f"{d['dt_mean_median']:.3g}", "alpha_T_max": f"{d['alpha_T_max']:.5f}",
                     "alpha_T_median": f"{d['alpha_T_median']:.3g}", "heads_alpha_T_above": d["heads_alpha_T_above"],
                     "threshold": d["threshold"]})
    return rows


def evaluation_steps(steps: list[int], n: int = 4) -> list[int]:
    """Up to ``n`` evaluation steps spread over training, the first and the last among them."""
    if len(steps) <= n:
        return list(steps)
    picks = {steps[round(i * (len(steps) - 1) / (n - 1))] for i in range(n)}
    return sorted(picks)


def write_cell_records(cell_folder: str, seq_len: int) -> list[str]:
    """Write ``along_training.png`` and ``decays.csv`` into the cell's folder where it has the records for them;
    returns the paths written."""
    written = []
    evaluations = read_steps(os.path.join(cell_folder, "lengthgen"))
    curves = {f"step {s:,}": (evaluations[s]["bucket_positions"], evaluations[s]["bucket_loss"])
              for s in evaluation_steps(sorted(evaluations))
              if evaluations[s].get("bucket_positions") and evaluations[s].get("bucket_loss")}
    if curves:
        name = os.path.basename(os.path.normpath(cell_folder))
        fig = plots.plot_loss_curves(curves, seq_len, f"{name}: loss against position along training (held-out)")
        written.append(plots.save_png(fig, os.path.join(cell_folder, "along_training.png")))
    rows = decay_rows(cell_folder)
    if rows:
        table = io.StringIO(newline="")
        w = csv.DictWriter(table, fieldnames=DECAY_FIELDS)
        w.writeheader()
        w.writerows(rows)
        path = os.path.join(cell_folder, "decays.csv")
        atomic_write_text(path, table.getvalue())
        written.append(path)
    return written
