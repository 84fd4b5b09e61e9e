"""``lightning-mamba export``: a training checkpoint -> the official directory layout.

Writes config.json + pytorch_model.bin (what mamba_ssm's ``MambaLMHeadModel.from_pretrained(DIR)`` reads), the
tokenizer (tokenizer.json when it is a tokenizers-library one) and lightning_mamba.json (tokenizer spec, seq_len;
the passkey prompt of a passkey run, which ``lightning-mamba passkey`` scores it with).
The JSON files are strict JSON (no NaN/Infinity): ``ssm_cfg`` holds only the settings that differ from the defaults.

    lightning-mamba export --ckpt runs/state64_len512/version_0/checkpoints/last.ckpt   # -> .../checkpoints/exported/
    lightning-mamba export --ckpt runs/state64_len512/version_0/checkpoints/last.ckpt --out exported/state64_len512
"""

from __future__ import annotations

import os
import sys
from typing import Literal

import torch
from jsonargparse import ArgumentParser

from ..models import ConfigError
from ..models.checkpoint import save_pretrained
from ..training.checkpoint_io import load_model
from . import run_command
from .common import CommandError, CommandParser, check_out_dir, default_out

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> ArgumentParser:
    p = CommandParser(prog="lightning-mamba export", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=str, required=True, help="A Lightning .ckpt of this project (or a checkpoint "
                   "directory, e.g. HF transformers' Mamba2 layout, to convert).")
    p.add_argument("--out", type=str | None, default=None, help="Output directory (created if needed; files are "
                   "replaced). Default: <checkpoint dir>/exported, next to the .ckpt (inside a checkpoint directory).")
    p.add_argument("--dtype", type=Literal["float32", "bfloat16", "float16"], default="float32",
                   help="Precision of the saved weights.")
    return p


def export(ckpt: str, out: str | None = None, dtype: str = "float32") -> list[str]:
    """Load ``ckpt``, write it to ``out`` (default: ``exported`` next to it); returns the paths written."""
    if not os.path.exists(ckpt):
        raise ConfigError(f"--ckpt {ckpt} does not exist")
    out = default_out(out, ckpt, "exported")
    check_out_dir(out)
    model, meta = load_model(ckpt, backend="torch", dtype=DTYPES[dtype])
    extra = {k: v for k, v in meta.items() if k not in ("mamba_config", "tokenizer")}
    return save_pretrained(model, out, tokenizer_spec=meta.get("tokenizer"), extra=extra)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> list[str]:
        paths = export(args.ckpt, args.out, args.dtype)
        out = os.path.dirname(paths[0])
        return [f"exported {args.ckpt} ({args.dtype}) to {out}:",
                *(f"  {os.path.basename(path)} ({os.path.getsize(path) / 1e6:.2f} MB)" for path in paths),
                "load with lightning_mamba.models.checkpoint.load_pretrained(DIR) or "
                "mamba_ssm's MambaLMHeadModel.from_pretrained(DIR)"]

    return run_command("export", work, (ConfigError, CommandError, OSError))


if __name__ == "__main__":
    sys.exit(main())
