"""What the forgetting callbacks' figures cost the training process (CPU; no GPU needed).

    python benchmarks/figure_cost.py                  # the state-statistics callback's six figures, five rounds
    python benchmarks/figure_cost.py --rounds 2 --positions 256

Each round hands the six figures one StateStatsCallback evaluation draws (state RMS, log retention and the retention
heatmap, for two probes; a 4-layer, 16-head model, --positions sampled positions) to a FigureQueue and times how long
the training process is busy with them: drawn in the training process (``in_process``, the baseline: what the
callbacks did before callbacks/figure_process.py), against handed to the drawing process. It then waits for the
drawing process and says how long the figures took to reach the event file. The first round of the drawing process
starts it (one process per training process); the medians leave the first round out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from functools import partial

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_mamba.analysis import plots  # noqa: E402
from lightning_mamba.callbacks.figure_process import FigureQueue  # noqa: E402


def recipes(positions: int, layers: int = 4, heads: int = 16, seq_len: int = 32) -> list:
    rng = np.random.default_rng(0)
    where = np.arange(1, positions + 1) * 16
    out = []
    for _probe in ("text", "newlines"):
        rms, log_retention = rng.random((positions, layers, heads)) + 0.5, -10 * rng.random((positions, layers, heads))
        retention = rng.random((layers, heads))
        out += [partial(plots.plot_state_norm, where, rms, seq_len, title="state RMS"),
                partial(plots.plot_log_retention, where, log_retention, seq_len, title="first-token retention"),
                partial(plots.plot_retention_heatmap, retention, seq_len, title="alpha", log_retention=np.log(retention))]
    return out


def time_round(queue: FigureQueue, figures: list, writer, step: int) -> tuple[float, float]:
    """(seconds the training process was busy handing the figures over, seconds until all were written)."""
    t0 = time.perf_counter()
    for i, make in enumerate(figures):
        queue.submit(make, f"figure_{i}", step, [writer])
    busy = time.perf_counter() - t0
    queue.collect(wait=True)
    return busy, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--positions", type=int, default=2048, help="sampled positions per curve (32K tokens / 16)")
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds must be >= 2 (the first round of the drawing process starts it and is left out)")
    from torch.utils.tensorboard import SummaryWriter

    figures = recipes(args.positions)
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        writer = SummaryWriter(folder)
        for name, in_process in (("in_process", True), ("drawing_process", False)):
            queue = FigureQueue(in_process=in_process)
            runs = [time_round(queue, figures, writer, step) for step in range(args.rounds)]
            rows[name] = (statistics.median(b for b, _ in runs[1:]), statistics.median(w for _, w in runs[1:]),
                          runs[0][0])
        writer.close()
    print(f"# {len(figures)} figures a round, {args.positions} positions a curve, {args.rounds} rounds "
          f"(medians without the first), {os.cpu_count()} CPU cores")
    print(f"{'contender':<16} {'busy ms':>9} {'written ms':>11} {'first round busy ms':>20}")
    for name, (busy, written, first) in rows.items():
        print(f"{name:<16} {1e3 * busy:9.1f} {1e3 * written:11.1f} {1e3 * first:20.1f}")
    base = rows["in_process"][0]
    print(f"ratio in_process/drawing_process (the training process's busy time): {base / rows['drawing_process'][0]:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
