"""``lightning-mamba analyze``: does a checkpoint forget? Loss far past T_train, the paper's verdict, state and
retention statistics, as PNG + JSON (and optionally TensorBoard) next to the checkpoint.

    lightning-mamba analyze --ckpt runs/state64_len512/version_0/checkpoints/last.ckpt
    lightning-mamba analyze --ckpt path/to/mamba2-130m --seq_len 8192 --tokenizer neox/tokenizer.json --text book.txt
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
from jsonargparse import ActionYesNo, ArgumentParser

from ..analysis import plots
from ..analysis.criterion import default_bucket, forgetting_verdict
from ..analysis.evaluator import bucket_curve, eval_rows, resolve_dtype, token_losses, window_mean
from ..mitigations.search import add_intervention_args, interventions_from_args
from ..analysis.state_stats import newline_probe, state_statistics
from ..mitigations.interventions import apply_interventions
from . import run_command
from ..atomic import atomic_write_json
from ..errors import UserError
from ..analysis.evaluator import write_position_losses_csv


class AnalyzeError(UserError):
    """A bad argument or input; main() prints it as one line."""


def add_input_args(p: ArgumentParser, out_name: str, n_rows: int) -> None:
    """The checkpoint, held-out text and evaluation settings that analyze and mitigate share."""
    p.add_argument("--ckpt", type=str, required=True, help="A Lightning .ckpt of this project, or an exported/official "
                   "checkpoint directory (config.json + weights).")
    p.add_argument("--out", type=str | None, default=None, help=f"Output directory (default: <checkpoint dir>/{out_name}).")
    p.add_argument("--seq_len", type=int | None, default=None, help="T_train; default: the one the checkpoint records "
                   "(required for official checkpoints, e.g. 8192 for the Mamba-2 release).")
    p.add_argument("--text", type=str | None, default=None, help="Held-out text: a file or a directory of .txt/.md files, "
                   "one document each, joined with EOS. Default: the embedded corpus' validation split.")
    p.add_argument("--tokenizer", type=str | None, default=None, help="'byte' or a tokenizer.json; default: the one the "
                   "checkpoint records.")
    p.add_argument("--cache_dir", type=str, default="data", help="Token caches of the default corpus (as data.cache_dir).")
    p.add_argument("--length", type=int | None, default=None, help="Positions to evaluate (default 16 x T_train).")
    p.add_argument("--n_rows", type=int, default=n_rows, help="Rows (prompts) averaged; the paper used 128.")
    p.add_argument("--bucket", type=int | None, default=None, help="Positions per bucket for the criterion "
                   "(default T_train // 8, at least 16).")
    p.add_argument("--threshold", type=float, default=2.0, help="Fails if a bucket exceeds threshold x the max "
                   "within T_train.")
    p.add_argument("--piece_len", type=int, default=2048, help="Tokens per forward (the state is carried).")
    p.add_argument("--batch_size", type=int, default=8, help="Rows per forward (logits: batch_size x piece_len x vocab).")
    p.add_argument("--dtype", type=Literal["float32", "bfloat16"], default="float32",
                   help="float32 (the paper's analysis precision) or bfloat16.")
    p.add_argument("--device", type=str | None, default=None, help="Default: cuda when available, else cpu.")
    p.add_argument("--backend", type=Literal["auto", "torch", "triton"], default="auto", help="SSD kernels.")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="lightning-mamba analyze", description=__doc__.split("\n\n")[0])
    add_input_args(p, "analysis", n_rows=2)
    p.add_argument("--stride", type=int | None, default=None, help="Tokens between state samples (default: the bucket).")
    p.add_argument("--probes", type=list[Literal["text", "newlines"]], default=["text", "newlines"],
                   help="State-statistics probes: held-out text, the newline token repeated.")
    p.add_argument("--tensorboard", action=ActionYesNo, default=False, help="Also write the scalars and figures as "
                   "TensorBoard events under <out>/tensorboard.")
    add_intervention_args(p)  # --rri, --dt_scale, --window, --state_norm: training-free mitigations
    return p


# ---- inputs -------------------------------------------------------------------------------------
def load_checkpoint(path: str, backend: str):
    from ..training.checkpoint_io import load_model
    model, meta = load_model(path, backend=backend, dtype=torch.float32)
    return model.eval(), dict(meta or {})


def load_tokenizer(name_or_path: str | None, meta: dict):
    """--tokenizer (``byte`` or a tokenizer.json path), else the spec the checkpoint records."""
    from ..data import load_tokenizer as from_name, tokenizer_from_spec

    if name_or_path is not None:
        return from_name(name_or_path)
    spec = meta.get("tokenizer")
    if not spec:
        raise AnalyzeError("the checkpoint does not record its tokenizer: pass --tokenizer (byte or a tokenizer.json, "
                           "e.g. GPT-NeoX-20B's for the official checkpoints)")
    return tokenizer_from_spec(spec)


def read_text_stream(path: str, tokenizer) -> np.ndarray:
    """A file, or a directory of .txt/.md/.text files (sorted), one document each, joined with EOS."""
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                       if f.endswith((".txt", ".md", ".text")))
        if not files:
            raise AnalyzeError(f"--text {path}: no .txt/.md/.text files in this directory")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise AnalyzeError(f"--text {path} does not exist")
    ids: list[int] = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            ids.extend(tokenizer.encode(fh.read()))
        ids.append(tokenizer.eos_id)
    return np.asarray(ids, dtype=np.int64)


def default_stream(tokenizer, seq_len: int, cache_dir: str) -> np.ndarray:
    """The embedded corpus' held-out split (the training runs' default split), through the data module; its token
    cache under ``cache_dir`` is reused or written."""
    from ..data import TextDataModule

    dm = TextDataModule(source="default", tokenizer=tokenizer, seq_len=seq_len, cache_dir=cache_dir)
    dm.prepare_data()
    return np.asarray(dm.val_tokens())


# ---- the analysis ---------------------------------------------------------------------------------
@dataclass
class Inputs:
    """What analyze and mitigate read before evaluating: the model (eval mode, on ``device``), its metadata,
    T_train, the tokenizer and the held-out rows of ``length + 1`` tokens."""

    model: torch.nn.Module
    meta: dict
    seq_len: int
    length: int
    tokenizer: object
    rows: torch.Tensor
    rows_info: dict
    dtype: torch.dtype
    device: torch.device


def load_inputs(args, length_error: Callable[[int, int], str | None]) -> Inputs:
    """Checks and loads --ckpt, --text, --seq_len, --tokenizer and the held-out rows; ``length_error(length, T_train)``
    says what is wrong with ``--length`` (default 16 x T_train) for the caller, or None."""
    dtype = resolve_dtype(args.dtype)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not os.path.exists(args.ckpt):
        raise AnalyzeError(f"--ckpt {args.ckpt} does not exist")
    if args.text and not os.path.exists(args.text):
        raise AnalyzeError(f"--text {args.text} does not exist")
    model, meta = load_checkpoint(args.ckpt, args.backend)
    model.to(device)
    T = args.seq_len or meta.get("seq_len")
    if not T:
        raise AnalyzeError("the checkpoint does not record its training length: pass --seq_len T_train "
                           "(8192 for the official Mamba-2 checkpoints)")
    T = int(T)
    length = args.length or 16 * T
    if length_error(length, T):
        raise AnalyzeError(length_error(length, T))
    tokenizer = load_tokenizer(args.tokenizer, meta)
    if tokenizer.vocab_size > model.config.padded_vocab_size:
        raise AnalyzeError(f"the tokenizer ({tokenizer!r}) has more ids than the model's embedding "
                           f"({model.config.padded_vocab_size}): pass the tokenizer the model was trained with")
    stream = read_text_stream(args.text, tokenizer) if args.text else default_stream(tokenizer, T, args.cache_dir)
    rows, info = eval_rows(stream, length + 1, args.n_rows, getattr(tokenizer, "eos_id", None))
    if info["note"]:
        print(f"note: {info['note']}", file=sys.stderr)
    return Inputs(model, dict(meta), T, length, tokenizer, rows, info, dtype, device)


def analyze(args) -> dict:
    t0 = time.perf_counter()
    inp = load_inputs(args, lambda length, T: f"--length {length} must exceed T_train={T} to say anything about "
                      "forgetting" if length <= T else None)
    model, T, length, tokenizer, rows, dtype, device = (inp.model, inp.seq_len, inp.length, inp.tokenizer, inp.rows,
                                                        inp.dtype, inp.device)
    bucket = args.bucket or default_bucket(T)
    stride = args.stride or bucket
    info = inp.rows_info

    mitigations, intervention = interventions_from_args(args, model, rows, T, dtype, device, args.batch_size)
    with apply_interventions(model, **mitigations):  # everything below the model as mitigated, if asked
        losses, stats = _evaluate(args, model, rows, tokenizer, T, length, stride, dtype, device)
    verdict = forgetting_verdict(losses, T, bucket, args.threshold)
    positions, curve = bucket_curve(losses, bucket)
    multiples = [m for m in (1, 2, 4, 8, 16, 32, 64, 128, 256) if m * T <= length]
    metrics = {f"loss@{m}x": window_mean(losses, m * T // 2, m * T) for m in multiples}

    cfg = model.config
    result = {
        "ckpt": os.path.abspath(args.ckpt), "seq_len": T, "length": length, "bucket": bucket, "stride": stride,
        "dtype": str(dtype).replace("torch.", ""), "rows": info,
        "state_size": cfg.state_size(), "state_size_ssm_only": cfg.state_size(ssm_only=True),
        "verdict": verdict.to_dict(), "metrics": metrics, "intervention": intervention if intervention["tag"] else None,
        "state": {p: s.summary(tuple(multiples)) for p, s in stats.items()},
        "seconds": time.perf_counter() - t0,
    }
    write_outputs(args, result, losses, positions, curve, stats)
    return result


def _evaluate(args, model, rows, tokenizer, T: int, length: int, stride: int, dtype, device):
    losses = token_losses(model, rows, args.piece_len, dtype, device, args.batch_size)
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
    return losses, stats


def write_outputs(args, result: dict, losses, positions, curve, stats: dict) -> None:
    ckpt = os.path.abspath(args.ckpt)
    # a mitigated run gets its own directory, so it never overwrites the plain analysis
    name = "analysis" + (f"-{result['intervention']['tag']}" if result.get("intervention") else "")
    out = result["out"] = args.out or os.path.join(os.path.dirname(ckpt) if os.path.isfile(ckpt) else ckpt, name)
    os.makedirs(out, exist_ok=True)
    T, v = result["seq_len"], result["verdict"]
    per_position = losses.double().mean(0).numpy()
    atomic_write_json(os.path.join(out, "verdict.json"), result, indent=2)
    atomic_write_json(os.path.join(out, "curve.json"),
                      {"bucket": result["bucket"], "positions": positions.tolist(), "bucket_loss": curve.tolist()})
    write_position_losses_csv(os.path.join(out, "curve.csv"), per_position)
    atomic_write_json(os.path.join(out, "state_stats.json"),
                      {p: {"summary": result["state"][p], "stats": s.to_dict()} for p, s in stats.items()})

    figures = {"loss_vs_position": plots.plot_loss_curve(positions, curve, T, args.threshold * v["max_in_window"])}
    for p, s in stats.items():
        figures[f"state_norm_{p}"] = plots.plot_state_norm(s.positions, s.rms, T, title=f"{p}: state RMS")
        figures[f"log_retention_{p}"] = plots.plot_log_retention(s.positions, s.log_retention, T, title=f"{p}: log10 R_t")
        if s.retention_T is not None:
            figures[f"retention_heatmap_{p}"] = plots.plot_retention_heatmap(s.retention_T, T, title=f"{p}: alpha_(1:{T})")
    writer = None
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(out, "tensorboard"))
        scalars = {f"lengthgen/{k}": x for k, x in result["metrics"].items()}
        scalars.update({"lengthgen/forgets": float(v["forgets"]),
                        "lengthgen/blowup_position": -1 if v["blowup_position"] is None else v["blowup_position"],
                        "lengthgen/ratio_4_16x": v["ratio_long_over_in"]})
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
    if v["forgets"]:
        lines.append(f"verdict: forgets (no bucket of {r['bucket']} above {v['threshold']} x {v['max_in_window']:.3f} "
                     f"up to position {v['evaluated_to']})")
    else:
        lines.append(f"verdict: FAILS to forget: blow-up at position {v['blowup_position']} "
                     f"({v['blowup_position'] / T:.2f} x T_train)")
    ratio = v["ratio_long_over_in"]
    lines.append("ratio mean[4T,16T] / mean[T/2,T]: " + ("n/a (needs --length >= 16 x T_train)" if ratio is None
                                                        else f"{ratio:.3f}"))
    s = r["state"].get("text")
    if s and "max_first_token" in s:
        lines.append(f"retention: {s['frac_heads_above_0.99']:.1%} of heads keep alpha_(1:T) > 0.99 "
                     f"(max {s['max_first_token']:.4f} at layer/head {s['max_first_token_at']}); "
                     f"state norm growth {s.get('norm_growth', float('nan')):.2f}x at {s.get('norm_growth_at')}")
    lines.append(f"written to {r['out']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # ValueError includes ConfigError and DataError
    return run_command("analyze", lambda: summary_lines(analyze(args)), (AnalyzeError, OSError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
