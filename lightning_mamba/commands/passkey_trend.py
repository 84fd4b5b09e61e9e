"""``lightning-mamba passkey-trend``: passkey accuracy along a training run (the evaluations PasskeyEvalCallback
wrote), as tables, an early-vs-late test of beyond-window accuracy (paper claim 10), JSON and a PNG.

    lightning-mamba passkey-trend --run runs/passkey_keep/version_0
    lightning-mamba passkey-trend --run runs/passkey_keep/version_0 --window 3 --z 2.5
"""

from __future__ import annotations

import os
import sys

from jsonargparse import ArgumentParser

from ..analysis import plots
from ..atomic import atomic_write_json
from ..study.passkey_trend import PasskeyTrendError, load_history, passkey_dir, plot_trend, summary_lines, trend
from . import run_command
from .common import CommandParser


def build_parser() -> ArgumentParser:
    p = CommandParser(prog="lightning-mamba passkey-trend", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=str, required=True, help="A run directory (runs/NAME/version_N) or its passkey/ "
                   "directory of step_N.json files.")
    p.add_argument("--threshold", type=float, default=0.95, help="In-window accuracy that counts as learned: the "
                   "early window starts at the first evaluation reaching it.")
    p.add_argument("--window", type=int, default=2, help="Evaluations pooled in the early and in the late sample.")
    p.add_argument("--z", type=float, default=2.0, help="|z| at which a change counts (falls / rises).")
    p.add_argument("--out", type=str | None, default=None, help="Output directory (default: the passkey directory).")
    return p


def run(args) -> list[str]:
    if args.window < 1:
        raise PasskeyTrendError(f"--window must be >= 1 (got {args.window})")
    if not 0 < args.threshold <= 1:
        raise PasskeyTrendError(f"--threshold must be in (0, 1] (got {args.threshold})")
    if args.z <= 0:
        raise PasskeyTrendError(f"--z must be > 0 (got {args.z})")
    if not os.path.isdir(args.run):
        raise PasskeyTrendError(f"--run {args.run} is not a directory")
    t = trend(load_history(args.run), args.threshold, args.window, args.z)
    out = args.out or passkey_dir(args.run)
    os.makedirs(out, exist_ok=True)
    atomic_write_json(os.path.join(out, "trend.json"), t, indent=2)
    plots.save_png(plot_trend(t), os.path.join(out, "trend.png"))
    return summary_lines(t) + [f"written to {out} (trend.json, trend.png)"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("passkey-trend", lambda: run(args), (PasskeyTrendError, OSError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
