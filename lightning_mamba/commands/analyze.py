"""``lightning-mamba analyze``: does a checkpoint forget? Loss far past T_train, the paper's verdict, state and
retention statistics, as PNG + JSON (and optionally TensorBoard) next to the checkpoint.

    lightning-mamba analyze --ckpt runs/state64_len512/version_0/checkpoints/last.ckpt
    lightning-mamba analyze --ckpt path/to/mamba2-130m --seq_len 8192 --tokenizer neox/tokenizer.json --text book.txt
"""

from __future__ import annotations

import glob
import os
import sys
import time
from typing import Literal

import numpy as np
from jsonargparse import ActionYesNo, ArgumentParser

from ..analysis import plots
from ..analysis.criterion import default_bucket
from ..analysis.evaluator import write_position_losses_csv
from ..analysis.forgetting import measure_forgetting
from ..analysis.state_stats import newline_probe, state_statistics
from ..atomic import atomic_write_json
from ..mitigations.interventions import apply_interventions, load_state_norms, parse_rri
from ..mitigations.search import add_intervention_args, interventions_from_args, state_norm_piece_len
from ..progress import phase
from . import run_command
from .common import (
    CommandError,
    CommandParser,
    add_checkpoint_args,
    add_heldout_args,
    check_out_dir,
    default_out,
    load_inputs,
)


class AnalyzeError(CommandError):
    """A bad argument or input of ``analyze``; main() prints it as one line."""


def build_parser() -> ArgumentParser:
    p = CommandParser(prog="lightning-mamba analyze", description=__doc__.split("\n\n")[0])
    add_checkpoint_args(p, "analysis")
    add_heldout_args(p)
    p.add_argument("--stride", type=int | None, default=None, help="Tokens between state samples (default: the bucket).")
    p.add_argument("--probes", type=list[Literal["text", "newlines"]], default=["text", "newlines"],
                   help="State-statistics probes: held-out text, the newline token repeated.")
    p.add_argument("--tensorboard", action=ActionYesNo, default=False, help="Also write the scalars and figures as "
                   "TensorBoard events under <out>/tensorboard.")
    add_intervention_args(p)  # --rri, --dt_scale, --window, --state_norm: training-free mitigations
    return p


# ---- the analysis ---------------------------------------------------------------------------------
def analyze(args) -> dict:
    t0 = time.perf_counter()
    check_args(args)
    inp = load_inputs(args, check_length)
    model, T, length, tokenizer, rows, dtype, device = (inp.model, inp.seq_len, inp.length, inp.tokenizer, inp.rows,
                                                        inp.dtype, inp.device)
    bucket = args.bucket or default_bucket(T)
    stride = args.stride or bucket

    mitigations, intervention = interventions_from_args(args, model, rows, T, dtype, device, args.batch_size)
    # the state norm is checked as each piece ends: as often as `mitigate` checks it, whatever --piece_len
    piece_len = args.piece_len
    if "state_norm" in mitigations:
        piece_len = intervention["piece_len"] = state_norm_piece_len(args.piece_len, T)
    with apply_interventions(model, **mitigations):  # everything below the model as mitigated, if asked
        with phase(f"analyze: loss vs position on {rows.size(0)} rows x {length} tokens"):
            report = measure_forgetting(model, rows, T, bucket, args.threshold, piece_len=piece_len, dtype=dtype,
                                        device=device, batch_size=args.batch_size)
        with phase(f"analyze: state statistics ({', '.join(args.probes)})"):
            stats = _state_stats(args, model, rows, tokenizer, T, length, stride, dtype, device)

    cfg = model.config
    result = {
        "ckpt": os.path.abspath(args.ckpt), "seq_len": T, "length": length, "bucket": bucket, "stride": stride,
        "dtype": dtype, "rows": inp.rows_info,
        "state_size": cfg.state_size(), "state_size_ssm_only": cfg.state_size(ssm_only=True),
        "verdict": report.verdict.to_dict(), "metrics": report.metrics(),
        "intervention": intervention if intervention["tag"] else None,
        "state": {p: s.summary(tuple(report.loss_at)) for p, s in stats.items()},
        "seconds": time.perf_counter() - t0,
    }
    with phase("analyze: writing figures and JSON"):
        write_outputs(args, result, report, stats)
    return result


def check_args(args) -> None:
    """analyze's own settings, before anything is loaded: --stride and the mitigations' --rri, --dt_scale, --window,
    --state_norm (those of load_inputs are checked there), and that the output directory can be made."""
    if args.stride is not None and args.stride < 1:
        raise AnalyzeError(f"--stride must be >= 1 (got {args.stride}): tokens between state samples; leave it out "
                           f"for the bucket")
    try:
        parse_rri(args.rri)
    except ValueError as e:
        raise AnalyzeError(f"--rri {args.rri}: {e}") from None
    if args.dt_scale is not None and not args.dt_scale > 0:
        raise AnalyzeError(f"--dt_scale must be > 0 (got {args.dt_scale}): dt' = dt_scale x dt")
    if args.window is not None and args.window < 1:
        raise AnalyzeError(f"--window must be >= 1 token (got {args.window})")
    if args.state_norm is not None and args.state_norm != "calibrate":
        if not os.path.isfile(args.state_norm):
            raise AnalyzeError(f"--state_norm {args.state_norm} is no file: give 'calibrate' (the largest state norms "
                               f"within T_train on the evaluation text) or a thresholds JSON, e.g. the verdict.json of "
                               f"an `analyze --state_norm calibrate` run")
        try:
            load_state_norms(args.state_norm)
        except (OSError, ValueError, AttributeError) as e:  # not JSON, or JSON without thresholds
            raise AnalyzeError(f"--state_norm {args.state_norm} is not a thresholds JSON ({e}): give 'calibrate' or the "
                               f"verdict.json of an `analyze --state_norm calibrate` run") from None
    if args.out is not None:  # (the default is a new folder beside the checkpoint's run)
        check_out_dir(args.out)


def check_length(length: int, seq_len: int) -> None:
    if length <= seq_len:
        raise AnalyzeError(f"--length {length} must exceed T_train={seq_len} to say anything about forgetting")


def _state_stats(args, model, rows, tokenizer, T: int, length: int, stride: int, dtype, device) -> dict:
    stats = {}
    for probe in args.probes:
        if probe == "text":
            inputs = rows[:, :-1]
        else:
            try:
                inputs = newline_probe(tokenizer, length)
            except ValueError as e:
                print(f"note: newline probe skipped ({e})", file=sys.stderr)
                continue
        stats[probe] = state_statistics(model, inputs, T, stride, dtype, device, probe=probe, batch_size=args.batch_size)
    return stats


FIGURE_PREFIXES = ("loss_vs_position", "state_norm_", "log_retention_", "retention_heatmap_")  # write_outputs' PNGs


def write_outputs(args, result: dict, report, stats: dict) -> None:
    # a mitigated run gets its own directory, so it never overwrites the plain analysis
    name = "analysis" + (f"-{result['intervention']['tag']}" if result.get("intervention") else "")
    out = result["out"] = default_out(args.out, args.ckpt, name)
    os.makedirs(out, exist_ok=True)
    T = result["seq_len"]
    atomic_write_json(os.path.join(out, "verdict.json"), result, indent=2)
    atomic_write_json(os.path.join(out, "curve.json"), {"bucket": report.bucket, "positions": report.positions.tolist(),
                                                        "bucket_loss": report.curve.tolist()})
    write_position_losses_csv(os.path.join(out, "curve.csv"), report.per_position)
    atomic_write_json(os.path.join(out, "state_stats.json"),
                      {p: {"summary": result["state"][p], "stats": s.to_dict()} for p, s in stats.items()})

    threshold_line = args.threshold * report.verdict.max_in_window
    figures = {"loss_vs_position": plots.plot_loss_curve(report.positions, report.curve, T, threshold_line,
                                                         threshold_factor=args.threshold)}
    for p, s in stats.items():
        figures[f"state_norm_{p}"] = plots.plot_state_norm(s.positions, s.rms, T, title=f"{p}: state RMS")
        figures[f"log_retention_{p}"] = plots.plot_log_retention(s.positions, s.log_retention, T, title=f"{p}: log10 R_t")
        if s.retention_T is not None:
            figures[f"retention_heatmap_{p}"] = plots.plot_retention_heatmap(
                s.retention_T, T, title=f"{p} probe: first-token retention over T_train = {T}",
                log_retention=s.log_retention_T)
    # an analysis run again into its folder replaces the last one: its figures of probes not run now (beside a
    # state_stats.json that no longer holds them) and its TensorBoard events (a second point at step 0) go
    for stale in glob.glob(os.path.join(out, "*.png")):
        if os.path.basename(stale)[:-4] not in figures and os.path.basename(stale).startswith(FIGURE_PREFIXES):
            os.unlink(stale)
    for old in glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*")):
        os.unlink(old)
    writer = None
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(out, "tensorboard"))
        scalars = report.scalars("lengthgen/")
        for p, summ in result["state"].items():  # the callbacks' tags: state/ for text, state_newlines/ ...
            prefix = "state" if p == "text" else f"state_{p}"
            scalars.update({f"{prefix}/{k}": x for k, x in summ.items() if isinstance(x, float)})
        for k, x in scalars.items():
            if x is not None and np.isfinite(x):
                writer.add_scalar(k, x, 0)
    for name, fig in figures.items():
        if writer is not None:
            writer.add_figure(f"analysis/{name}", fig, 0, close=False)
        plots.save_png(fig, os.path.join(out, f"{name}.png"))
    if writer is not None:
        writer.close()


def summary_lines(r: dict) -> list[str]:
    T, v = r["seq_len"], r["verdict"]
    lines = [f"checkpoint: {r['ckpt']}  (T_train={T}, N_S={r['state_size'] / 1e6:.3f}M, "
             f"{r['rows']['rows']} rows x {r['length']} positions, {r['dtype']})"]
    if r.get("intervention"):
        lines.append(f"intervention: {r['intervention']['tag']} (training-free mitigation; the model as trained is "
                     "not what is measured here)")
    if v["forgets"] is None:
        lines.append(f"verdict: undetermined: {v['undetermined']}")
    elif v["forgets"]:
        lines.append(f"verdict: forgets (no bucket of {r['bucket']} above {v['threshold']} x {v['max_in_window']:.3f} "
                     f"up to position {v['evaluated_to']})")
    else:
        lines.append(f"verdict: FAILS to forget: blow-up at position {v['blowup_position']} "
                     f"({v['blowup_position'] / T:.2f} x T_train)")
    ratio = v["ratio_long_over_in"]  # None, too, when the verdict is undetermined
    lines.append("ratio mean[4T,16T] / mean[T/2,T]: " + (
        "n/a (needs --length >= 16 x T_train)" if ratio is None and r["length"] < 16 * T else
        "n/a (the loss is not finite)" if ratio is None or not np.isfinite(ratio) else f"{ratio:.3f}"))
    ratio = v["ratio_16_64x"]
    lines.append("ratio mean[16T,64T] / mean[T/2,T]: " + (
        "n/a (needs --length >= 64 x T_train)" if ratio is None else
        "n/a (the loss is not finite)" if not np.isfinite(ratio) else  # a diverged model's: no "nan" printed
        f"{ratio:.3f} (95% bootstrap interval {v['ratio_16_64x_lo']:.3f} - {v['ratio_16_64x_hi']:.3f} over "
        f"{v['rows']} rows)"))
    s = r["state"].get("text")
    if s and "max_first_token" in s:
        lines.append(f"retention: {s['frac_heads_above_0.99']:.1%} of heads keep alpha_(1:T) > 0.99 "
                     f"(max {s['max_first_token']:.4f} at layer/head {s['max_first_token_at']}); "
                     f"state norm growth {s.get('norm_growth', float('nan')):.2f}x at {s.get('norm_growth_at')}")
    lines.append(f"written to {r['out']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # ValueError includes ConfigError and DataError
    return run_command("analyze", lambda: summary_lines(analyze(args)), (CommandError, OSError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
