"""``lightning-mamba mitigate``: make a checkpoint forget without training, and compare the fixes on one figure.

Each training-free mitigation (RRI, dt scaling, exact sliding window) gets the setting with the lowest loss at
4 x T_train on held-out text (the paper's rule), state normalization its thresholds from the norms within
T_train; then all of them, the model as trained and any other checkpoints (``--compare``, e.g. a state-passing
fine-tune) are evaluated on the same held-out rows to 16 x T_train. Writes mitigation.json, mitigation.md and
loss_vs_position.png.

    lightning-mamba mitigate --ckpt runs/x/version_0/checkpoints/last.ckpt \
        --compare '{state passing: runs/x_sp/version_0/checkpoints/last.ckpt}'
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Literal

import torch
from jsonargparse import ArgumentParser

from ..analysis import plots
from ..analysis.criterion import default_bucket
from ..analysis.evaluator import eval_rows, resolve_dtype
from ..analysis.mitigation import compare_mitigations, markdown_table
from .analyze import AnalyzeError, default_stream, load_checkpoint, load_tokenizer, read_text_stream

METHODS = ("rri", "dt_scale", "window", "state_norm")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="lightning-mamba mitigate", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=str, required=True, help="The model to fix: a Lightning .ckpt of this project or an "
                   "exported/official checkpoint directory.")
    p.add_argument("--compare", type=dict[str, str], default={}, help="Other checkpoints evaluated as they are, "
                   "{name: path}, e.g. a state-passing fine-tune of --ckpt.")
    p.add_argument("--methods", type=list[Literal[METHODS]], default=list(METHODS), help="Mitigations to compare.")
    p.add_argument("--out", type=str | None, default=None, help="Output directory (default: <checkpoint dir>/mitigation).")
    p.add_argument("--seq_len", type=int | None, default=None, help="T_train; default: the one the checkpoint records.")
    p.add_argument("--text", type=str | None, default=None, help="Held-out text (file or directory); default: the "
                   "embedded corpus' validation split.")
    p.add_argument("--tokenizer", type=str | None, default=None, help="'byte' or a tokenizer.json; default: the "
                   "checkpoint's.")
    p.add_argument("--cache_dir", type=str, default="data", help="Token caches of the default corpus.")
    p.add_argument("--length", type=int | None, default=None, help="Positions to evaluate (default 16 x T_train).")
    p.add_argument("--n_rows", type=int, default=8, help="Held-out rows averaged (the search uses the same rows).")
    p.add_argument("--at_multiple", type=int, default=4, help="The search scores the loss at this multiple of T_train.")
    p.add_argument("--bucket", type=int | None, default=None, help="Positions per bucket (default T_train // 8, >= 16).")
    p.add_argument("--threshold", type=float, default=2.0, help="The paper's failure threshold.")
    p.add_argument("--piece_len", type=int, default=2048, help="Tokens per forward (the state is carried).")
    p.add_argument("--batch_size", type=int, default=8, help="Rows per forward.")
    p.add_argument("--dtype", type=Literal["float32", "bfloat16"], default="float32")
    p.add_argument("--device", type=str | None, default=None, help="Default: cuda when available, else cpu.")
    p.add_argument("--backend", type=Literal["auto", "torch", "triton"], default="auto")
    return p


def mitigate(args) -> dict:
    t0 = time.perf_counter()
    dtype = resolve_dtype(args.dtype)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for path in [args.ckpt, *args.compare.values()]:
        if not os.path.exists(path):
            raise AnalyzeError(f"{path} does not exist (--ckpt / --compare)")
    model, meta = load_checkpoint(args.ckpt, args.backend)
    T = int(args.seq_len or meta.get("seq_len") or 0)
    if not T:
        raise AnalyzeError("the checkpoint does not record its training length: pass --seq_len T_train")
    length = args.length or 16 * T
    if length < args.at_multiple * T:
        raise AnalyzeError(f"--length {length} must reach the search's {args.at_multiple} x T_train = "
                           f"{args.at_multiple * T}")
    tokenizer = load_tokenizer(args.tokenizer, meta)
    others = {}
    for name, path in args.compare.items():
        other, other_meta = load_checkpoint(path, args.backend)
        if other_meta.get("tokenizer") and meta.get("tokenizer") and other_meta["tokenizer"] != meta["tokenizer"]:
            raise AnalyzeError(f"--compare {name}: {path} uses another tokenizer than --ckpt: the losses would not compare")
        others[name] = other.to(device)
    stream = read_text_stream(args.text, tokenizer) if args.text else default_stream(tokenizer, T, args.cache_dir)
    rows, info = eval_rows(stream, length + 1, args.n_rows, getattr(tokenizer, "eos_id", None))
    if info["note"]:
        print(f"note: {info['note']}", file=sys.stderr)
    bucket = args.bucket or default_bucket(T)
    entries = compare_mitigations(model.to(device), rows, T, bucket, args.methods, others, args.at_multiple,
                                  args.threshold, args.piece_len, dtype, device, args.batch_size,
                                  log=lambda msg: print(f"mitigate: {msg}", file=sys.stderr))
    ckpt = os.path.abspath(args.ckpt)
    out = args.out or os.path.join(os.path.dirname(ckpt) if os.path.isfile(ckpt) else ckpt, "mitigation")
    result = {"ckpt": ckpt, "compare": {k: os.path.abspath(v) for k, v in args.compare.items()}, "seq_len": T,
              "length": length, "bucket": bucket, "rows": info, "at_multiple": args.at_multiple,
              "dtype": str(dtype).replace("torch.", ""), "entries": entries, "out": out,
              "seconds": time.perf_counter() - t0}
    write_outputs(result)
    return result


def write_outputs(result: dict) -> None:
    out = result["out"]
    os.makedirs(out, exist_ok=True)
    T = result["seq_len"]
    _write(os.path.join(out, "mitigation.json"), json.dumps(result, indent=1))
    _write(os.path.join(out, "mitigation.md"), "\n".join(markdown_table(result["entries"], T)) + "\n")
    curves = {f"{e['name']} ({e['setting']})" if e["setting"] != "none" else e["name"]: (e["positions"], e["curve"])
              for e in result["entries"]}
    fig = plots.plot_loss_curves(curves, T, title=f"mitigations, T_train = {T}")
    plots.save_png(fig, os.path.join(out, "loss_vs_position.png"))


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = mitigate(args)
    except (AnalyzeError, OSError, ValueError) as e:  # includes ConfigError and DataError: one line each
        print(f"mitigate: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(markdown_table(result["entries"], result["seq_len"])))
    print(f"written to {result['out']} (mitigation.json, mitigation.md, loss_vs_position.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
