"""``lightning-mamba passkey``: passkey retrieval accuracy of a checkpoint over prompt lengths x needle depths, and
its T_recall, as PNG + JSON.

The prompt is the one the model trained on where the checkpoint records it (data.passkey_template and
data.passkey_digits: a passkey run's .ckpt records them, and so does its export; official checkpoints and directories
exported before exports kept them do not), else the paper's template with 5-digit keys. --template and --digits
override it; a note on stderr says when the checkpoint's are used.

    lightning-mamba passkey --ckpt runs/default/version_0/checkpoints/last.ckpt
    lightning-mamba passkey --ckpt path/to/mamba2-130m --tokenizer neox/tokenizer.json --seq_len 8192 \\
        --lengths 4K 8K 16K 32K 64K --n_depths 5 --n_samples 8
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

from jsonargparse import ArgumentParser

from ..analysis import plots
from ..analysis.evaluator import resolve_dtype
from ..analysis.passkey import evaluate_passkey, plot_passkey_curve, plot_passkey_heatmap, recall_threshold_problem
from ..atomic import atomic_write_json
from ..data.passkey import PasskeyError, PasskeyGenerator, PasskeyTemplate, check_depth, check_lengths, default_depths
from . import run_command
from .common import (
    CommandError,
    CommandParser,
    add_checkpoint_args,
    check_checkpoint_args,
    check_out_dir,
    default_out,
    open_checkpoint,
    open_tokenizer,
    resolve_device,
)

DEFAULT_MULTIPLES = (0.5, 1, 2, 4, 8, 16)
UNITS = {"k": 2**10, "m": 2**20}


class PasskeyCommandError(CommandError):
    """A bad argument or input of ``passkey``; main() prints it as one line."""


def build_parser() -> ArgumentParser:
    p = CommandParser(prog="lightning-mamba passkey", description=__doc__.split("\n\n")[0])
    add_checkpoint_args(p, "passkey")  # --ckpt, --out, --seq_len (T_train: marked in the figures, unit of the
    # default lengths), --tokenizer, --piece_len, --batch_size, --dtype, --device, --backend
    p.add_argument("--lengths", type=str, nargs="+", default=None, help="Prompt lengths in tokens (1K = 1024, 1M = "
                   "2**20), e.g. --lengths 1K 2K 4K. Default: 0.5, 1, 2, 4, 8, 16 x T_train.")
    p.add_argument("--depths", type=float, nargs="+", default=None, help="Needle depths in [0, 1] (fraction of the "
                   "filler before the needle). Default: (i + 0.5) / n_depths.")
    p.add_argument("--n_depths", type=int, default=5, help="Evenly spaced depths when --depths is not given.")
    p.add_argument("--n_samples", type=int, default=4, help="Prompts (keys) per (length, depth) cell.")
    p.add_argument("--template", type=PasskeyTemplate, default=PasskeyTemplate(), help="The prompt's text. Default: "
                   "the data.passkey_template the checkpoint's run trained with (a passkey run's .ckpt, or its export, "
                   "records it), else the paper's. Fields not given take the paper's")
    # unset fields stay None, so that a template given in part or whole is told from none given (given_template)
    p.set_defaults({f"template.{f.name}": None for f in dataclasses.fields(PasskeyTemplate)})
    p.add_argument("--digits", type=int | None, default=None, help="Digits of a key. Default: the "
                   "data.passkey_digits the checkpoint's run trained with, else 5 (the paper's).")
    p.add_argument("--threshold", type=float, default=0.95, help="T_recall: longest length with accuracy > this, in [0, 1).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the keys.")
    return p


def parse_length(text: str) -> int:
    """'4096', '4K' (4096), '1M' (1048576), '1.5K' (1536)."""
    s = str(text).strip().lower()
    try:
        value = float(s[:-1]) * UNITS[s[-1]] if s and s[-1] in UNITS else float(s)
    except ValueError:
        raise PasskeyCommandError(f"--lengths {text!r} is not a length: use tokens, e.g. 4096, 4K or 1M") from None
    if not math.isfinite(value) or value != int(value) or value < 1:  # (int() of inf raised OverflowError)
        raise PasskeyCommandError(f"--lengths {text!r} must be a positive whole number of tokens")
    return int(value)


def given_template(template) -> PasskeyTemplate | None:
    """--template: the fields given over the paper's; None when no field was given. jsonargparse parses a dataclass
    argument into a Namespace (with __path__ when the template came from a file, as --template
    configs/passkey/code.yaml): keep the dataclass's fields only."""
    if isinstance(template, PasskeyTemplate):
        return template
    fields = {f.name: getattr(template, f.name, None) for f in dataclasses.fields(PasskeyTemplate)}
    fields = {name: value for name, value in fields.items() if value is not None}
    return PasskeyTemplate(**fields) if fields else None


def trained_prompt(meta: dict) -> dict:
    """The template and key digits of the passkey data the checkpoint trained on (meta's ``passkey``, from its
    data.passkey_template and data.passkey_digits: see checkpoint_io.trained_passkey); {} when it records none."""
    recorded = meta.get("passkey")
    if recorded is None:
        return {}
    try:  # a directory's lightning_mamba.json may have been edited by hand
        template, digits = PasskeyTemplate(**recorded["template"]), recorded["digits"]
    except (TypeError, KeyError):
        digits = None
    if type(digits) is not int or digits < 1:
        raise PasskeyCommandError(f"the checkpoint's passkey record {recorded!r:.60} is not a template (instruction, "
                                  f"filler, needle, question, answer) and digits >= 1: pass --template and --digits, "
                                  f"or re-export the checkpoint")
    return {"template": template, "digits": digits}


def run(args) -> dict:
    check_checkpoint_args(args)
    dtype = args.dtype
    resolve_dtype(dtype)  # one the evaluator knows (the evaluation takes the name: tf32 is float32 and a setting)
    device = resolve_device(args.device)
    depths = [check_depth(d) for d in args.depths] if args.depths else default_depths(args.n_depths)
    lengths = [parse_length(x) for x in args.lengths] if args.lengths else None
    if args.n_samples < 1:
        raise PasskeyCommandError(f"--n_samples must be >= 1 (got {args.n_samples})")
    if args.seed < 0:  # numpy's seeding said only "expected non-negative integer", after the model was loaded
        raise PasskeyCommandError(f"--seed must be >= 0 (got {args.seed}): it seeds the keys")
    if args.digits is not None and args.digits < 1:
        raise PasskeyCommandError(f"--digits must be >= 1 (got {args.digits})")
    template = given_template(args.template)
    if problem := recall_threshold_problem(args.threshold):
        raise PasskeyCommandError(f"--threshold {problem}")
    check_out_dir(default_out(args.out, args.ckpt, "passkey"))
    model, meta = open_checkpoint(args)
    tokenizer = open_tokenizer(args, meta, model)
    T = args.seq_len or meta.get("seq_len")
    if lengths is None:
        if not T:
            raise PasskeyCommandError("the checkpoint does not record its training length: pass --lengths (e.g. "
                                      "--lengths 4K 8K 16K) or --seq_len T_train")
        lengths = [int(m * T) for m in DEFAULT_MULTIPLES]
    # the command line's template and digits, else the ones the model trained with, else the paper's
    trained = trained_prompt(meta) if template is None or args.digits is None else {}
    template_source = "--template" if template is not None else "checkpoint" if trained else "default"
    digits_source = "--digits" if args.digits is not None else "checkpoint" if trained else "default"
    template = template or trained.get("template", PasskeyTemplate())
    digits = args.digits or trained.get("digits", 5)
    from_checkpoint = []  # (what, the data setting it comes from, the flag that overrides it)
    if template_source == "checkpoint":
        from_checkpoint.append(("the passkey template", "data.passkey_template", "--template"))
    if digits_source == "checkpoint":
        from_checkpoint.append((f"{digits}-digit keys", "data.passkey_digits", "--digits"))
    if from_checkpoint:  # one line, so that scoring on a prompt other than the paper's is never silent
        words, settings, flags = zip(*from_checkpoint)
        print(f"note: using {' and '.join(words)} this model trained with ({', '.join(settings)}); pass "
              f"{' or '.join(flags)} to override", file=sys.stderr)
    generator = PasskeyGenerator(tokenizer, template, digits)
    if not args.lengths:  # the default multiples of T_train: drop those shorter than the template, and say so
        short = [n for n in lengths if n < generator.min_length]
        lengths = [n for n in lengths if n >= generator.min_length]
        if short:
            print(f"note: lengths {short} are shorter than the template ({generator.min_length} tokens with "
                  f"{tokenizer.name}) and are skipped", file=sys.stderr)
        if not lengths:
            raise PasskeyCommandError(f"every default length ({short}) is shorter than the template: pass --lengths")
    lengths = sorted(set(check_lengths(generator, lengths)))
    model.to(device)
    grid = evaluate_passkey(model, generator, lengths, depths, args.n_samples, args.seed, args.piece_len, dtype,
                            device, args.batch_size)
    out = default_out(args.out, args.ckpt, "passkey")
    os.makedirs(out, exist_ok=True)
    result = {"ckpt": os.path.abspath(args.ckpt), "seq_len": int(T) if T else None, "tokenizer": tokenizer.name,
              "template": dataclasses.asdict(template), "template_source": template_source, "digits": digits,
              "digits_source": digits_source, "template_tokens": generator.min_length,
              "canonical_tokenization": generator.canonical,
              "dtype": args.dtype, "seed": args.seed, "state_size": model.config.state_size(),
              **grid.to_dict(args.threshold, T), "out": out}
    atomic_write_json(os.path.join(out, "passkey.json"), result, indent=2)
    plots.save_png(plot_passkey_heatmap(grid, T), os.path.join(out, "passkey_heatmap.png"))
    plots.save_png(plot_passkey_curve(grid, T, args.threshold), os.path.join(out, "passkey_vs_length.png"))
    return result


def summary_lines(r: dict) -> list[str]:
    lines = [f"checkpoint: {r['ckpt']}  (T_train={r['seq_len']}, tokenizer {r['tokenizer']}, "
             f"{len(r['depths'])} depths x {r['samples_per_cell']} samples per length, {r['dtype']})"]
    lines += [f"  length {n:>8}: accuracy {a:.3f}" for n, a in zip(r["lengths"], r["accuracy_by_length"])]
    if r.get("accuracy_by_distance"):
        lines.append("  by the needle's distance before the question, in units of T_train: " + ", ".join(
            f"{k} {v['accuracy']:.2f} (n={v['prompts']})" for k, v in r["accuracy_by_distance"].items()))
    t = r["t_recall"]
    lines.append(f"T_recall (longest length with accuracy > {r['t_recall_threshold']}): "
                 + (f"{t} tokens" if t is not None else "none of the lengths"))
    lines.append(f"written to {r['out']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # ValueError includes ConfigError and DataError
    return run_command("passkey", lambda: summary_lines(run(args)),
                       (CommandError, PasskeyError, OSError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
