"""``lightning-mamba``: the LightningCLI (fit / validate / test / predict) plus the study's own commands."""

from __future__ import annotations

import importlib
import sys

from lightning.pytorch.cli import LightningCLI

from lightning.fabric.utilities.exceptions import MisconfigurationException

from .callbacks.nan_guard import NanGuard, NonFiniteError
from .checkpoint_io import check_resume
from .data import DataError, TextDataModule
from .lit import MambaLitModule
from .models import ConfigError

# Commands beyond Lightning's: name -> module with a ``main(argv)``.
COMMANDS = {
    "export": "lightning_mamba.commands.export",
    "analyze": "lightning_mamba.commands.analyze",
    "passkey": "lightning_mamba.commands.passkey",
    "passkey-trend": "lightning_mamba.commands.passkey_trend",
    "sweep": "lightning_mamba.commands.sweep",
    "mitigate": "lightning_mamba.commands.mitigate",
}


class MambaCLI(LightningCLI):
    def _parse_ckpt_path(self) -> None:
        # LightningCLI replaces the model settings by the checkpoint's: refuse a different shape instead of
        # silently dropping what the user asked for.
        sub = self.config.get("subcommand")
        if sub and self.config[sub].get("ckpt_path"):
            check_resume(self.config[sub].ckpt_path, self.config[sub].model.as_dict())
        super()._parse_ckpt_path()

    def add_arguments_to_parser(self, parser) -> None:
        # NaN/Inf guard on every run: --nan_guard.on_nonfinite stop|skip
        parser.add_lightning_class_args(NanGuard, "nan_guard")
        # The model's vocabulary is the tokenizer's: one setting, not two that can disagree.
        parser.link_arguments("data.vocab_size_for_model", "model.init_args.vocab_size" if self.subclass_mode_model
                              else "model.vocab_size", apply_on="instantiate")


def lightning_cli(args=None, run: bool = True) -> MambaCLI:
    return MambaCLI(
        MambaLitModule,
        TextDataModule,
        subclass_mode_data=True,  # TextDataModule by default; experiments may pick e.g. PasskeyDataModule
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "Train and study Mamba-2 LMs. Extra commands: " + ", ".join(COMMANDS)
                       + " (run `lightning-mamba COMMAND --help`)."},
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> None:
    from_shell = argv is None  # LightningCLI then reads sys.argv itself (and does not warn about args)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        try:
            module = importlib.import_module(COMMANDS[argv[0]])
        except ModuleNotFoundError:
            sys.exit(f"lightning-mamba: the '{argv[0]}' command is not available in this version")
        sys.exit(module.main(argv[1:]))
    try:
        lightning_cli(None if from_shell else argv)
    except Exception as e:
        cause = user_error(e)
        if cause is None:
            raise
        sys.exit(f"error: {cause}")  # bad settings: one line that says what to change, no traceback


def user_error(e: BaseException) -> BaseException | None:
    """The user-facing error (bad setting, non-finite step) behind ``e`` (jsonargparse wraps errors raised while instantiating classes)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, (ConfigError, DataError, NonFiniteError, MisconfigurationException)):
            return e
        if isinstance(e, ModuleNotFoundError) and str(e).startswith("Requirement "):
            # Lightning's accelerators and strategies name the package they lack, e.g. tpu -> torch_xla
            return ModuleNotFoundError(f"{e} (needed by the chosen trainer.accelerator / trainer.strategy)")
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


if __name__ == "__main__":
    main()
