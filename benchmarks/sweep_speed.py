"""How fast `lightning-mamba sweep` trained its cells, evaluations and all, from the times its evaluation records were
written (no GPU needed; read a study folder where it ran, or a listing of the records' times brought back from there).

    python benchmarks/sweep_speed.py runs/study/regime                 # the times written in the records
    python benchmarks/sweep_speed.py --listing times.txt               # lines "<unix time> [HH:MM:SS.ff] <path>"
    python benchmarks/sweep_speed.py --listing a.txt --baseline_listing b.txt   # and a x (this / baseline) line

A cell's length-generalization callback writes cells/<cell>/lengthgen/step_<N>.json after each evaluation along
training. Per cell this prints the steps per second from its second record to its last one at a whole evaluation
interval: every training step, evaluation, figure and checkpoint of that span counts; the first evaluation (it
compiles the scan's kernels for the evaluation's shapes) and the record of a budget's stop are left out. With
several cells at once (`--processes N`), their total steps per second over the span every cell was in that state,
and tokens per second at --tokens_per_step. The listing's optional HH:MM:SS.ff column (what `stat -c '%Y %y'`
prints) gives the fraction of a second an integer unix time lacks.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from collections import Counter, defaultdict

RECORD = re.compile(r"cells/(?P<cell>[^/]+)/lengthgen/step_(?P<step>\d+)\.json$")


def from_folder(study: str) -> list[tuple[float, str]]:
    """Each record's ``written_at_ms`` (the wall clock the callback wrote in it; a copied study keeps it), else the
    file's modification time (records written before that field)."""
    paths = glob.glob(os.path.join(study, "cells", "*", "lengthgen", "step_*.json"))
    if not paths:
        raise SystemExit(f"sweep_speed: no cells/*/lengthgen/step_*.json under {study}: give the sweep's --out folder")
    return [(written_at(p), p) for p in paths]


def written_at(path: str) -> float:
    try:
        with open(path) as f:
            when = json.load(f).get("written_at_ms")
    except (OSError, ValueError, AttributeError):
        when = None
    return when / 1000 if isinstance(when, int) else os.stat(path).st_mtime


def from_listing(path: str) -> list[tuple[float, str]]:
    out = []
    for line in open(path):
        fields = line.split()
        record = next((f for f in fields if RECORD.search(f)), None)
        if record is None or not re.fullmatch(r"\d+(\.\d+)?", fields[0]):
            continue  # another file's line, a comment
        when = float(fields[0])
        clock = re.fullmatch(r"\d\d:\d\d:\d\d(\.\d+)", fields[1])
        if clock and "." not in fields[0]:
            when += float(clock.group(1))
        out.append((when, record))
    if not out:
        raise SystemExit(f"sweep_speed: no '<unix time> ... cells/<cell>/lengthgen/step_<N>.json' line in {path}")
    return out


def cell_records(records: list[tuple[float, str]]) -> dict[str, list[tuple[float, int]]]:
    """{cell: [(time, step), ...]} from the second record to the last at a whole evaluation interval."""
    cells: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for when, path in records:
        m = RECORD.search(path)
        cells[m.group("cell")].append((when, int(m.group("step"))))
    kept = {}
    for cell, rows in cells.items():
        rows.sort(key=lambda r: r[1])
        steps = [s for _, s in rows]
        every = Counter(b - a for a, b in zip(steps, steps[1:])).most_common(1)
        every = every[0][0] if every else 0
        while len(rows) > 2 and every and rows[-1][1] % every:
            rows.pop()  # the evaluation at a budget's stop
        if len(rows) >= 3:
            kept[cell] = rows[1:]
    if not kept:
        raise SystemExit("sweep_speed: no cell has three evaluation records yet (the first is left out): "
                         "give it a longer --time_per_cell")
    return kept


def steps_at(rows: list[tuple[float, int]], when: float) -> float:
    for (t0, s0), (t1, s1) in zip(rows, rows[1:]):
        if t0 <= when <= t1:
            return s0 + (s1 - s0) * (when - t0) / (t1 - t0)
    raise ValueError(f"time {when} is outside the records")


def speeds(records: list[tuple[float, str]]) -> tuple[dict[str, tuple[float, int, float]], tuple[float, float] | None]:
    """Per cell (steps/s, steps, seconds); with several cells, (their total steps/s, seconds) over their common span."""
    cells = cell_records(records)
    per_cell = {}
    for cell, rows in cells.items():
        (t0, s0), (t1, s1) = rows[0], rows[-1]
        per_cell[cell] = ((s1 - s0) / (t1 - t0), s1 - s0, t1 - t0)
    if len(cells) < 2:
        return per_cell, None
    start = max(rows[0][0] for rows in cells.values())
    end = min(rows[-1][0] for rows in cells.values())
    if end <= start:
        return per_cell, None
    total = sum(steps_at(rows, end) - steps_at(rows, start) for rows in cells.values())
    return per_cell, (total / (end - start), end - start)


def report(name: str, records: list[tuple[float, str]], tokens_per_step: int) -> float:
    per_cell, together = speeds(records)
    print(f"{name}:")
    for cell in sorted(per_cell, key=lambda c: [int(x) for x in re.findall(r"\d+", c)] or [0]):
        rate, steps, seconds = per_cell[cell]
        print(f"  {cell:24s} {rate:8.1f} steps/s  {rate * tokens_per_step / 1e6:6.2f}M tokens/s  "
              f"({steps:,} steps in {seconds:.1f} s)")
    if together is None:
        if len(per_cell) > 1:
            print("  (the cells ran one after another: their mean is the figure compared)")
        return sum(r for r, _, _ in per_cell.values()) / len(per_cell)
    rate, seconds = together
    print(f"  {len(per_cell)} cells at once          {rate:8.1f} steps/s  {rate * tokens_per_step / 1e6:6.2f}M tokens/s  "
          f"(in all, over the {seconds:.1f} s every cell was past its first evaluation)")
    return rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("study", nargs="?", help="the sweep's --out folder, read where it ran")
    p.add_argument("--listing", help="a file of '<unix time> [HH:MM:SS.ff] <record path>' lines instead")
    p.add_argument("--baseline_listing", help="a second listing, the named baseline (e.g. one cell alone)")
    p.add_argument("--tokens_per_step", type=int, default=16384, help="the study's tokens_per_batch")
    args = p.parse_args(argv)
    if (args.study is None) == (args.listing is None):
        p.error("give a study folder or --listing FILE")
    records = from_folder(args.study) if args.study else from_listing(args.listing)
    rate = report(args.study or args.listing, records, args.tokens_per_step)
    if args.baseline_listing:
        base = report(f"baseline {args.baseline_listing}", from_listing(args.baseline_listing), args.tokens_per_step)
        print(f"x baseline: {rate / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
