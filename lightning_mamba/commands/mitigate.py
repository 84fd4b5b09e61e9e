"""``lightning-mamba mitigate``: make a checkpoint forget without training, and compare the fixes on one figure.

Each training-free mitigation (RRI, dt scaling, exact sliding window) gets the setting with the lowest loss at
4 x T_train on held-out text (the paper's rule), state normalization its thresholds from the norms within
T_train; then all of them, the model as trained and any other checkpoints (``--compare``, e.g. a state-passing
fine-tune) are evaluated on the same held-out rows to --length (default 64 x T_train). Writes mitigation.json,
mitigation.md and loss_vs_position.png.

    lightning-mamba mitigate --ckpt runs/x/version_0/checkpoints/last.ckpt \
        --compare '{state passing: runs/x_sp/version_0/checkpoints/last.ckpt}'
"""

from __future__ import annotations

import os
import sys
import time
from typing import Literal

from jsonargparse import ArgumentParser

from ..analysis import plots
from ..analysis.criterion import default_bucket
from ..atomic import atomic_write_json, atomic_write_text
from ..mitigations.search import AS_TRAINED, METHOD_NAMES, compare_mitigations, markdown_table
from . import run_command
from .common import (
    CommandError,
    CommandParser,
    add_checkpoint_args,
    add_heldout_args,
    check_out_dir,
    default_out,
    load_checkpoint,
    load_inputs,
)

METHODS = ("rri", "dt_scale", "window", "state_norm")


def build_parser() -> ArgumentParser:
    p = CommandParser(prog="lightning-mamba mitigate", description=__doc__.split("\n\n")[0])
    add_checkpoint_args(p, "mitigation")  # --ckpt, --seq_len, --tokenizer, ... as `analyze`
    add_heldout_args(p)  # --text, --length, --n_rows, --bucket, --threshold, ... as `analyze`
    p.add_argument("--compare", type=dict[str, str], default={}, help="Other checkpoints evaluated as they are, "
                   "{name: path}, e.g. a state-passing fine-tune of --ckpt.")
    p.add_argument("--methods", type=list[Literal[METHODS]], default=list(METHODS), help="Mitigations to compare.")
    p.add_argument("--at_multiple", type=int, default=4, help="The search scores the loss at this multiple of T_train "
                   "(on the same held-out rows as the evaluation).")
    return p


def mitigate(args) -> dict:
    t0 = time.perf_counter()
    if args.at_multiple < 1:
        raise CommandError(f"--at_multiple must be >= 1 (got {args.at_multiple}): the search scores the loss at this "
                           f"multiple of T_train (the paper's is 4)")
    if len(set(args.methods)) < len(args.methods):  # each was searched and evaluated again, into a second equal row
        raise CommandError(f"--methods {'[' + ', '.join(args.methods) + ']'} names a method twice: give each once")
    check_out_dir(default_out(args.out, args.ckpt, "mitigation"))
    taken = [AS_TRAINED, *METHOD_NAMES.values()]
    for name, path in args.compare.items():
        if name in taken:  # two rows of one name, and the plot kept one curve of the two "as trained"
            raise CommandError(f"--compare {name}: {name!r} names one of mitigate's own rows ({', '.join(taken)}): "
                               f"give the checkpoint another name")
        if not os.path.exists(path):
            raise CommandError(f"{path} does not exist (--compare)")
    k = args.at_multiple

    def check_length(length: int, T: int) -> None:
        if length < k * T:
            raise CommandError(f"--length {length} must reach the search's {k} x T_train = {k * T}")

    inp = load_inputs(args, check_length)
    others = {}
    for name, path in args.compare.items():
        try:
            other, other_meta = load_checkpoint(path, args.backend)
        except (ValueError, OSError) as e:  # (the loader's line says what is wrong with the file, not which flag)
            raise CommandError(f"--compare {name}: {e}") from None
        if other_meta.get("tokenizer") and inp.meta.get("tokenizer") and other_meta["tokenizer"] != inp.meta["tokenizer"]:
            raise CommandError(f"--compare {name}: {path} uses another tokenizer than --ckpt: the losses would not compare")
        if inp.tokenizer.vocab_size > other.config.padded_vocab_size:  # (a checkpoint that records no tokenizer)
            raise CommandError(f"--compare {name}: {path} has an embedding of {other.config.padded_vocab_size} ids, "
                               f"fewer than the tokenizer of --ckpt ({inp.tokenizer.vocab_size}): compare checkpoints "
                               f"trained with the same tokenizer")
        others[name] = other.to(inp.device)
    T = inp.seq_len
    bucket = args.bucket or default_bucket(T)
    entries = compare_mitigations(inp.model, inp.rows, T, bucket, args.methods, others, k, args.threshold,
                                  args.piece_len, inp.dtype, inp.device, args.batch_size,
                                  log=lambda msg: print(f"mitigate: {msg}", file=sys.stderr))
    out = default_out(args.out, args.ckpt, "mitigation")
    result = {"ckpt": os.path.abspath(args.ckpt), "compare": {k: os.path.abspath(v) for k, v in args.compare.items()},
              "seq_len": T, "length": inp.length, "bucket": bucket, "rows": inp.rows_info, "at_multiple": k,
              "dtype": inp.dtype, "entries": entries, "out": out,
              "seconds": time.perf_counter() - t0}
    write_outputs(result)
    return result


def write_outputs(result: dict) -> None:
    out = result["out"]
    os.makedirs(out, exist_ok=True)
    T = result["seq_len"]
    atomic_write_json(os.path.join(out, "mitigation.json"), result, indent=1)
    atomic_write_text(os.path.join(out, "mitigation.md"), "\n".join(markdown_table(result["entries"], T, result["at_multiple"])) + "\n")
    curves = {f"{e['name']} ({e['setting']})" if e["setting"] != "none" else e["name"]: (e["positions"], e["curve"])
              for e in result["entries"]}
    fig = plots.plot_loss_curves(curves, T, title=f"mitigations, T_train = {T}")
    plots.save_png(fig, os.path.join(out, "loss_vs_position.png"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # ValueError includes ConfigError and DataError
    return run_command("mitigate", lambda: summary_lines(mitigate(args)), (CommandError, OSError, ValueError))


def summary_lines(result: dict) -> list[str]:
    return [*markdown_table(result["entries"], result["seq_len"], result["at_multiple"]),
            f"written to {result['out']} (mitigation.json, mitigation.md, loss_vs_position.png)"]


if __name__ == "__main__":
    sys.exit(main())
