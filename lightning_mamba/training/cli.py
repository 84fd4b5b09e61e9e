"""The LightningCLI of ``lightning-mamba fit|validate|test|predict``: our LightningModule and data modules, the NaN
guard on every run, the vocabulary linked from the tokenizer, and resumes that refuse a different model shape."""

from __future__ import annotations

import sys

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from ..data import TextDataModule
from .checkpoint_io import check_resume
from .module import MambaLitModule
from .nan_guard import NanGuard


class ResumeAtLr(L.Callback):
    """The optimizer and lr schedule restored from --ckpt_path run at the checkpoint's lr: rescale them to model.lr
    (the parameter groups keep their ratios, e.g. model.a_lr_mult's)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            ratio = pl_module.hparams.lr / scheduler.base_lrs[0]  # group 0 trains at model.lr
            scheduler.base_lrs = [lr * ratio for lr in scheduler.base_lrs]
            for group in scheduler.optimizer.param_groups:
                group["lr"] *= ratio
                group["initial_lr"] *= ratio


class MambaCLI(LightningCLI):
    def parse_arguments(self, parser, args) -> None:
        # what was typed, as opposed to what a config file or a default gave (see _parse_ckpt_path)
        self._argv = [] if isinstance(args, (dict, Namespace)) else list(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI replaces the model settings by the checkpoint's: refuse a different shape instead of
        # silently dropping what the user asked for.
        sub = self.config.get("subcommand")
        lr = None
        if sub and self.config[sub].get("ckpt_path"):
            given = self.config[sub].model.as_dict()
            # a --model.lr typed with --ckpt_path wins: how a run stopped by the NaN guard goes on at a lower lr
            typed = any(a == "--model.lr" or a.startswith("--model.lr=") for a in self._argv)
            check_resume(self.config[sub].ckpt_path, given, kept=("lr",) if typed else ())
            lr = given.get("lr") if typed else None
        super()._parse_ckpt_path()
        if lr is not None and self.config[sub].model.lr != lr:
            rank_zero_warn(f"resuming at model.lr={lr} (the checkpoint's is {self.config[sub].model.lr})")
            self.config[sub].model.lr = lr
            self._resume_at_lr = True

    def before_fit(self) -> None:
        if getattr(self, "_resume_at_lr", False):
            self.trainer.callbacks.append(ResumeAtLr())

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
