"""The LightningCLI of ``lightning-mamba fit|validate|test|predict``: our LightningModule and data modules, the NaN
guard on every run, the vocabulary linked from the tokenizer, and resumes that refuse a different model shape."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from ..data import TextDataModule
from .checkpoint_io import check_resume
from .module import MambaLitModule
from .nan_guard import NanGuard


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


def lightning_cli(args=None, run: bool = True, description: str = "Train and study Mamba-2 LMs.") -> MambaCLI:
    return MambaCLI(
        MambaLitModule,
        TextDataModule,
        subclass_mode_data=True,  # TextDataModule by default; experiments may pick e.g. PasskeyDataModule
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": description},
        args=args,
        run=run,
    )
