"""What ``analyze``, ``mitigate`` and ``passkey`` share: their checkpoint and evaluation arguments, declared once,
and the loading behind them (checkpoint, tokenizer, held-out text, rows), with one-line errors."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from jsonargparse import ArgumentParser

from ..analysis.criterion import bucket_problem, threshold_problem
from ..analysis.evaluator import eval_rows, resolve_dtype
from ..analysis.forgetting import DEFAULT_EVAL_ROWS, DEFAULT_MAX_MULTIPLE
from ..atomic import file_in_the_way
from ..errors import UserError
from ..training.run_checks import OneLineErrors


class CommandError(UserError):
    """A bad argument or input of a command; ``run_command`` prints it as one line."""


class CommandParser(OneLineErrors, ArgumentParser):
    """The commands' argument parser: an argument error is one line (and a hint), not the usage first."""


# ---- arguments ------------------------------------------------------------------------------------------
def add_checkpoint_args(p: ArgumentParser, out_name: str) -> None:
    """The model to load, where outputs go, and how to run it: --ckpt, --out, --seq_len, --tokenizer, --piece_len,
    --batch_size, --dtype, --device, --backend."""
    p.add_argument("--ckpt", type=str, required=True, help="A Lightning .ckpt of this project, or a checkpoint directory "
                   "(ours exported, official mamba_ssm, or HF transformers Mamba2).")
    p.add_argument("--out", type=str | None, default=None, help=f"Output directory (default: <checkpoint dir>/{out_name}).")
    p.add_argument("--seq_len", type=int | None, default=None, help="T_train; default: the one the checkpoint records "
                   "(official checkpoints record none: 8192 for the Mamba-2 release).")
    p.add_argument("--tokenizer", type=str | None, default=None, help="'byte' or a tokenizer.json (e.g. GPT-NeoX-20B's "
                   "for the official Mamba-2); default: the one the checkpoint records.")
    p.add_argument("--piece_len", type=int, default=2048, help="Tokens per forward (the state is carried: constant memory).")
    p.add_argument("--batch_size", type=int, default=8, help="Rows (prompts) per forward (logits: batch_size x "
                   "piece_len x vocab).")
    p.add_argument("--dtype", type=Literal["float32", "tf32", "bfloat16"], default="float32",
                   help="float32 (the paper's analysis precision), tf32 (float32 with TF32 matmuls on a GPU: the "
                   "precision mamba_ssm's scan already takes its dot products in; faster, a loss moved by ~1e-4) or "
                   "bfloat16.")
    p.add_argument("--device", type=str | None, default=None, help="Default: cuda when available, else cpu.")
    p.add_argument("--backend", type=Literal["auto", "torch", "triton"], default="auto", help="SSD kernels.")


def add_heldout_args(p: ArgumentParser) -> None:
    """The held-out rows and the forgetting criterion: --text, --cache_dir, --length, --n_rows, --bucket, --threshold."""
    p.add_argument("--text", type=str | None, default=None, help="Held-out text: a file or a directory of .txt/.md files, "
                   "one document each, joined with EOS. Default: the validation split of the corpus the checkpoint "
                   "records (e.g. data.source code), else of the embedded corpus.")
    p.add_argument("--cache_dir", type=str, default="data", help="Token caches of the default corpus (as data.cache_dir).")
    p.add_argument("--length", type=int | None, default=None, help="Positions to evaluate (default "
                   f"{DEFAULT_MAX_MULTIPLE} x T_train).")
    p.add_argument("--n_rows", type=int, default=DEFAULT_EVAL_ROWS, help="Rows (prompts) averaged; the paper used "
                   "128. Fewer than 32 make the bootstrap interval of the ratio wide.")
    p.add_argument("--bucket", type=int | None, default=None, help="Positions per bucket for the criterion "
                   "(default T_train // 8, at least 16, at most T_train // 2).")
    p.add_argument("--threshold", type=float, default=2.0, help="Fails if a bucket exceeds threshold (> 1) x the "
                   "max within T_train (the first and the last bucket are not judged).")


def check_threshold(threshold: float) -> None:
    """--threshold of the forgetting criterion (analysis.criterion.threshold_problem)."""
    if problem := threshold_problem(threshold):
        raise CommandError(f"--threshold {problem}")


def check_out_dir(out: str, flag: str = "--out") -> None:
    """The output directory (``out``: --out or its default) is a directory or can be made one: one line, before any
    work, when a file stands where it or a folder above it would go."""
    path = file_in_the_way(os.path.abspath(out))
    if path is not None:
        where = "is a file" if path == os.path.abspath(out) else f"lies under {path}, which is a file"
        raise CommandError(f"{flag} {out} {where}: give a directory path (it is made if needed)")


def default_out(out: str | None, ckpt: str, name: str) -> str:
    """--out, else ``name`` next to the checkpoint file (or inside the checkpoint directory)."""
    if out:
        return out
    ckpt = os.path.abspath(ckpt)
    return os.path.join(os.path.dirname(ckpt) if os.path.isfile(ckpt) else ckpt, name)


def resolve_device(name: str | None) -> torch.device:
    """--device (default: cuda when available, else cpu), checked: one line for a name that is no device, or a
    device this machine lacks."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CommandError(f"--device {name} is not a device: use cpu or cuda (cuda:N for the N-th GPU)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name}: this machine has no CUDA device (or this torch is built without CUDA): "
                           f"use --device cpu, or leave --device out")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CommandError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 to "
                           f"cuda:{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CommandError(f"--device {name}: MPS is not available here: use --device cpu")
    return device


def check_checkpoint_args(args) -> None:
    """The numbers of :func:`add_checkpoint_args` must be positive (--seq_len 0 would otherwise mean "the
    checkpoint's", silently), and a --tokenizer file must exist (checked before the checkpoint is loaded, and named
    by this flag: the data module's message names data.tokenizer)."""
    for flag in ("seq_len", "piece_len", "batch_size"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise CommandError(f"--{flag} must be >= 1 (got {value})" + (
                ": leave it out for the one the checkpoint records" if flag == "seq_len" else ""))
    tokenizer = getattr(args, "tokenizer", None)
    if tokenizer not in (None, "byte", "bpe") and not os.path.isfile(os.path.expanduser(tokenizer)):
        raise CommandError(f"--tokenizer {tokenizer} is no file: give 'byte' or the path of a tokenizer.json (leave "
                           f"it out for the one the checkpoint records)")


# ---- loading --------------------------------------------------------------------------------------------
def load_checkpoint(path: str, backend: str):
    """(model in eval mode, fp32, on CPU; its metadata) from a .ckpt or a checkpoint directory."""
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
        raise CommandError("the checkpoint does not record its tokenizer: pass --tokenizer (byte or a tokenizer.json, "
                           "e.g. GPT-NeoX-20B's for the official checkpoints)")
    return tokenizer_from_spec(spec)


def check_exists(flag: str, path: str | None) -> None:
    if path and not os.path.exists(path):
        raise CommandError(f"{flag} {path} does not exist")


def open_checkpoint(args):
    """--ckpt, checked: (model, meta)."""
    check_exists("--ckpt", args.ckpt)
    return load_checkpoint(args.ckpt, args.backend)


def open_tokenizer(args, meta: dict, model):
    """--tokenizer or the checkpoint's, checked against the model's embedding."""
    tokenizer = load_tokenizer(args.tokenizer, meta)
    if tokenizer.vocab_size > model.config.padded_vocab_size:
        raise CommandError(f"the tokenizer ({tokenizer!r}) has more ids than the model's embedding "
                           f"({model.config.padded_vocab_size}): pass the tokenizer the model was trained with")
    return tokenizer


def read_text_stream(path: str, tokenizer) -> np.ndarray:
    """A file, or a directory of .txt/.md/.text files (sorted), one document each, joined with EOS."""
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                       if f.endswith((".txt", ".md", ".text")))
        if not files:
            raise CommandError(f"--text {path}: no .txt/.md/.text files in this directory")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise CommandError(f"--text {path} does not exist")
    ids: list[int] = []
    has_text = False
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        has_text = has_text or bool(text.strip())
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eos_id)
    if not has_text:  # a stream of EOS alone would be repeated into rows and judged as if it were text
        raise CommandError(f"--text {path} holds no text (only whitespace or nothing): give a file, or a directory of "
                           f".txt/.md/.text files, with held-out text")
    return np.asarray(ids, dtype=np.int64)


def default_stream(tokenizer, seq_len: int, cache_dir: str, data: dict | None = None) -> np.ndarray:
    """The held-out split of the corpus the checkpoint was trained on (``data``: the data settings it records, e.g.
    ``source code`` and its packages), else of the embedded corpus, through the data module; its token cache under
    ``cache_dir`` is reused or written."""
    from ..data import TextDataModule

    settings = {"source": "default", **(data or {})}
    print(f"held-out text: the validation split of data.source {settings['source']}", file=sys.stderr)
    dm = TextDataModule(**settings, tokenizer=tokenizer, seq_len=seq_len, cache_dir=cache_dir)
    dm.prepare_data()
    return np.asarray(dm.val_tokens())


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
    dtype: str  # --dtype, as the evaluator takes it (analysis.evaluator.DTYPES)
    device: torch.device


def load_inputs(args, check_length: Callable[[int, int], None]) -> Inputs:
    """Checks and loads --ckpt, --text, --seq_len, --tokenizer and the held-out rows; ``check_length(length, T_train)``
    raises the caller's error when ``--length`` (default DEFAULT_MAX_MULTIPLE x T_train) does not suit it."""
    check_checkpoint_args(args)
    for flag in ("length", "n_rows", "bucket"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise CommandError(f"--{flag} must be >= 1 (got {value})")
    check_threshold(args.threshold)
    dtype = args.dtype
    resolve_dtype(dtype)  # one the evaluator knows (a caller other than the CLI may pass anything)
    device = resolve_device(args.device)
    check_exists("--ckpt", args.ckpt)
    check_exists("--text", args.text)
    model, meta = load_checkpoint(args.ckpt, args.backend)
    model.to(device)
    T = args.seq_len or meta.get("seq_len")
    if not T:
        raise CommandError("the checkpoint does not record its training length: pass --seq_len T_train "
                           "(8192 for the official Mamba-2 checkpoints)")
    T = int(T)
    if args.bucket is not None and (problem := bucket_problem(args.bucket, T)):
        raise CommandError(f"--bucket {problem}")
    length = args.length or DEFAULT_MAX_MULTIPLE * T
    check_length(length, T)
    tokenizer = open_tokenizer(args, meta, model)
    stream = read_text_stream(args.text, tokenizer) if args.text else default_stream(tokenizer, T, args.cache_dir,
                                                                                           meta.get("data"))
    rows, info = eval_rows(stream, length + 1, args.n_rows, getattr(tokenizer, "eos_id", None))
    if info["note"]:
        print(f"note: {info['note']}", file=sys.stderr)
    return Inputs(model, dict(meta), T, length, tokenizer, rows, info, dtype, device)
