"""The LightningCLI of ``lightning-mamba fit|validate|test|predict``: our LightningModule and data modules, the NaN
guard on every run, the vocabulary linked from the tokenizer, resumes that refuse a different model shape (and honour
a typed --model.lr), and a checkpoint plus a non-zero exit on SIGTERM."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import typing
import warnings

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import BasePredictionWriter, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from ..atomic import atomic_write
from ..data import TextDataModule
from ..errors import UserError
from ..models.config import SPEED_ONLY_SETTINGS
from .checkpoint_io import check_resume, model_config, settle_pretrained
from .module import MambaLitModule
from .nan_guard import NanGuard
from .predictions import TokenLossWriter
from .run_checks import (
    OneLineErrorParser,
    SettingError,
    check_config_kinds,
    check_fresh_log_version,
    check_one_of_each_callback,
    check_output_folders,
    check_settings,
    not_text_config,
    run_guarded,
    typed_options,
    user_error,
)
from .stops import CheckpointAtStop, CheckpointOnSigterm


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


class RefusedFitCleanup(L.Callback):
    """A fit refused before its first training step leaves the run directories as they were. Some settings are found
    bad only when the data module sets up or builds its loaders (a seq_len or batch_size the corpus cannot fill) or
    the model sets up (model.cuda_graph on a CPU): after the logger made ``<name>/version_<n>/`` (events,
    config.yaml), a version without a step that pushed the next run to ``version_<n+1>``; and a refused --ckpt_path
    resume, which goes on in its run's folder, left an events file there and that run's config.yaml and
    hparams.yaml overwritten by the refused settings. Checking them all before the Trainer runs would build the data
    twice, so the folders are put back instead, while no training batch has started (nothing of a step logged or
    checkpointed): a folder that did not exist when the fit began is removed, all in it being this run's; in one
    that did, the files this run added are removed and the two it rewrites restored."""

    REWRITTEN = ("config.yaml", "hparams.yaml")  # LightningCLI's SaveConfigCallback, the logger's hyperparameters

    def __init__(self, trainer: L.Trainer):
        # log_dir fixes the next free version now, the one the logger would take a moment later (only rank 0's
        # loggers write)
        folders = [getattr(logger, "log_dir", None) for logger in trainer.loggers] if trainer.is_global_zero else []
        self.folders = [_new_top(d, getattr(logger, "root_dir", None)) for d, logger in zip(folders, trainer.loggers)
                        if d and not os.path.exists(d)]
        self.existing = {d: (set(os.listdir(d)), {name: _read_bytes(os.path.join(d, name)) for name in self.REWRITTEN
                                                  if os.path.isfile(os.path.join(d, name))})
                         for d in folders if d and os.path.isdir(d)}
        self.trained = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.trained = True

    def remove(self) -> None:
        if self.trained:
            return
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)
        for folder, (names, kept) in self.existing.items():
            for name in set(os.listdir(folder)) - names:
                if os.path.isfile(os.path.join(folder, name)):  # this run's events file, a config.yaml it added
                    os.unlink(os.path.join(folder, name))
            for name, data in kept.items():
                atomic_write(os.path.join(folder, name), lambda f, data=data: f.write(data))


def _new_top(log_dir: str, root_dir: str | None) -> str:
    """The outermost folder of ``log_dir`` that does not exist yet, below the logger's root (``<save_dir>/<name>``,
    never itself, which other runs share): with TensorBoard's sub_dir, ``version_<n>`` rather than its sub-folder."""
    root = os.path.abspath(root_dir) if root_dir else None
    top = os.path.abspath(log_dir)
    while root is not None and os.path.dirname(top).startswith(root + os.sep) and not os.path.exists(os.path.dirname(top)):
        top = os.path.dirname(top)
    return top


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class MambaCLI(LightningCLI):
    def parse_arguments(self, parser, args) -> None:
        # what was typed, as opposed to what a config file or a default gave (see _parse_ckpt_path)
        self._argv = [] if isinstance(args, (dict, Namespace)) else list(sys.argv[1:] if args is None else args)
        for key in typed_options(self._argv):  # before jsonargparse, which asks for a typed class's own arguments
            if key.split(".")[0] in LIGHTNING_OPTIMIZER_KEYS:
                raise not_our_optimizer(key.split(".")[0])
        check_config_kinds(self._argv, {"model": MambaLitModule, "data": TextDataModule, "trainer": L.Trainer})
        try:
            super().parse_arguments(parser, args)
        except UnicodeDecodeError as e:  # a --config that is not text: jsonargparse's reader fails with a traceback
            raise not_text_config(self._argv, e) from None
        sub = self.config.get("subcommand")
        follow_default_root_dir(self.config[sub] if sub else self.config, self._argv)
        if sub in ("validate", "test", "predict"):
            evaluate_into_a_new_version(self.config[sub], self._argv)
        check_settings(self.config[sub] if sub else self.config)  # what the Trainer would answer with a traceback

    def _run_subcommand(self, subcommand: str) -> None:
        self._cleanup = None  # before_fit sets it
        try:
            run_guarded(lambda: super(MambaCLI, self)._run_subcommand(subcommand), self.trainer)  # a full disk: one line
        except Exception as e:
            if self._cleanup is not None and user_error(e) is not None:  # a refused fit: no run directory left
                self._cleanup.remove()
            raise

    def _parse_ckpt_path(self) -> None:
        # LightningCLI replaces the model settings by the checkpoint's: refuse a different shape instead of
        # silently dropping what the user asked for.
        sub = self.config.get("subcommand")
        lr = None
        typed_wins: dict = {}
        step = 0  # where the fit starts
        if sub and self.config[sub].get("ckpt_path"):
            given = self.config[sub].model.as_dict()
            # a --model.lr typed with --ckpt_path wins: how a run stopped by the NaN guard goes on at a lower lr;
            # so do replan_schedule and the scan's speed-only settings (a resumed study cell takes a faster scan)
            typed = typed_options(self._argv)
            kept = tuple(k for k in ("lr", "replan_schedule", *SPEED_ONLY_SETTINGS) if f"model.{k}" in typed)
            data = data_settings(self.config[sub])
            step = check_resume(self.config[sub].ckpt_path, given, kept=kept, tokenizer=data.get("tokenizer"),
                                bpe_vocab_size=data.get("bpe_vocab_size"))
            self._ckpt_step = step
            lr = given.get("lr") if "lr" in kept else None
            typed_wins = {k: given[k] for k in kept if k != "lr"}  # lr: below, with its own line
        if sub == "fit" and step is not None:
            check_steps_left(self.config[sub], step)
        super()._parse_ckpt_path()
        for key, value in typed_wins.items():  # typed with --ckpt_path: wins over the checkpoint's
            self.config[sub].model[key] = value
        if sub == "fit" and self.config[sub].get("ckpt_path"):
            resume_into_run_directory(self.config[sub])
        if lr is not None and self.config[sub].model.lr != lr:
            rank_zero_warn(f"resuming at model.lr={lr} (the checkpoint's is {self.config[sub].model.lr})")
            self.config[sub].model.lr = lr
            self._resume_at_lr = True

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        for key in LIGHTNING_OPTIMIZER_KEYS:  # (from a config file)
            if config.get(key) is not None:
                raise not_our_optimizer(key)
        self._resumed_pretrained = None
        self._pretrained_lines: list[str] = []
        if config.get("model") and config.model.get("pretrained") and not self.subclass_mode_model:
            if config.get("ckpt_path"):
                # a resumed fine-tune: --ckpt_path holds the weights and fixes the shape (check_resume), so the file
                # it started from is not read (it may be gone); the setting is kept as a record (instantiate_classes)
                self._resumed_pretrained = config.model.pretrained
                config.model.pretrained = None
            else:
                self._pretrained_lines = apply_pretrained(config, self._argv)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self._pretrained_lines and rank_zero_only.rank == 0:  # the weights loaded: "pretrained: loaded ..." is
            print("\n".join(self._pretrained_lines), file=sys.stderr, flush=True)  # true (a refused file: no line)
        if self._resumed_pretrained is not None:  # config.yaml and the new checkpoints still say where it started
            config = self.config[self.subcommand] if self.subcommand else self.config
            config.model.pretrained = self._resumed_pretrained
            self.model.hparams.pretrained = self._resumed_pretrained

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        # every Trainer this CLI builds, `lightning-mamba fit` and the sweep's cells (run=False) alike
        check_one_of_each_callback((self._get(self.config_init, "trainer", default={}) or {}).get("callbacks") or [])
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks += [CheckpointOnSigterm(), CheckpointAtStop()]
        drop_lr_monitor_without_logger(trainer)
        return trainer

    def before_fit(self) -> None:
        for logger in self.trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # no hp_metric = -1 (Lightning's placeholder) in TensorBoard
                logger._default_hp_metric = False
        check_output_folders(self.trainer)
        check_fresh_log_version(self.trainer, self.config["fit"])
        self._cleanup = RefusedFitCleanup(self.trainer)
        self.trainer.callbacks.append(self._cleanup)
        if getattr(self, "_resume_at_lr", False):
            self.trainer.callbacks.append(ResumeAtLr())

    def before_validate(self) -> None:
        check_fresh_log_version(self.trainer, self.config["validate"])  # the CSVLogger would delete a run's metrics
        at_checkpoint_step(self.trainer, getattr(self, "_ckpt_step", None))

    def before_test(self) -> None:
        check_fresh_log_version(self.trainer, self.config["test"])
        at_checkpoint_step(self.trainer, getattr(self, "_ckpt_step", None))

    def before_predict(self) -> None:
        # LightningCLI drops what trainer.predict returns: without a writer of the user's, the per-token losses are
        # written to the run directory (training/predictions.py)
        if not any(isinstance(cb, BasePredictionWriter) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(TokenLossWriter())
        at_checkpoint_step(self.trainer, getattr(self, "_ckpt_step", None))

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print("\n".join(fit_summary(self.trainer)), flush=True)

    def add_arguments_to_parser(self, parser) -> None:
        ints_before_floats(parser, "trainer.")
        # NaN/Inf guard on every run: --nan_guard.on_nonfinite stop|skip
        parser.add_lightning_class_args(NanGuard, "nan_guard")
        # The model's vocabulary is the tokenizer's: one setting, not two that can disagree.
        parser.link_arguments("data.vocab_size_for_model", "model.init_args.vocab_size" if self.subclass_mode_model
                              else "model.vocab_size", apply_on="instantiate")


def follow_default_root_dir(config: Namespace, argv: list[str]) -> None:
    """``trainer.default_root_dir DIR`` (typed or from a config file) moves the run directory to
    ``DIR/<name>/version_<n>``: the logger's ``save_dir`` (configs/train.yaml: ``runs``) follows it, unless
    ``--trainer.logger.init_args.save_dir`` is typed. Lightning uses default_root_dir only where no logger sets the
    place, so with the config's logger the option did nothing at all. (A config printed with --print_config holds
    default_root_dir, so ``fit --config`` of it goes to the same place.)"""
    root = (config.get("trainer") or Namespace()).get("default_root_dir")
    if root is None or "trainer.logger.save_dir" in typed_options(argv):
        return
    for init in logger_init_args(config):
        if "save_dir" in init:
            init.save_dir = root


def logger_init_args(config: Namespace) -> list[Namespace]:
    """The init_args of each logger the config gives by class_path (trainer.logger: one or a list)."""
    loggers = (config.get("trainer") or Namespace()).get("logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    inits = [logger.get("init_args") if isinstance(logger, Namespace) else None for logger in loggers]
    return [init for init in inits if isinstance(init, Namespace)]


def at_checkpoint_step(trainer: L.Trainer, step: int | None) -> None:
    """validate / test / predict of a --ckpt_path: the trainer's step is the checkpoint's, so the forgetting records
    (``lengthgen/step_<N>.json``, ``state_stats/...``), the TensorBoard points and the logged metrics say which step's
    weights they measured. Lightning restores the step counters only in fit, so they read step 0 (a step-200
    checkpoint's verdict was filed as ``step_0``). Only these two counters of the fit loop are set: the number of
    optimizer steps (``trainer.global_step``) and the step the loggers use."""
    if not step:
        return
    loop = trainer.fit_loop.epoch_loop
    loop.automatic_optimization.optim_progress.optimizer.step.total.completed = step
    loop.manual_optimization.optim_step_progress.total.completed = 0
    loop._batches_that_stepped = step


def evaluate_into_a_new_version(config: Namespace, argv: list[str]) -> None:
    """validate / test / predict given a run's own config.yaml log to the next free version of its name, as they do
    before the run is resumed. A resumed fit records its version in config.yaml (resume_into_run_directory), and the
    evaluation went into that run's directory: its config.yaml overwritten by the evaluation's, its TensorBoard
    curves given points at step 0. So did a sweep cell's, whose version '' is the name's own folder, the cell's.
    A typed --trainer.logger.init_args.version is kept."""
    if "trainer.logger.version" in typed_options(argv):
        return
    for init in logger_init_args(config):
        version = init.get("version")
        if version is None or init.get("save_dir") is None:
            continue
        folder = os.path.join(str(init.save_dir), str(init.get("name") or ""),
                              version if isinstance(version, str) else f"version_{version}")
        if os.path.isdir(folder) and os.listdir(folder):
            rank_zero_info(f"{folder} holds a run: this evaluation logs to the next free version of its name "
                           f"(--trainer.logger.init_args.version picks one)")
            init.version = None


def drop_lr_monitor_without_logger(trainer: L.Trainer) -> None:
    """``--trainer.logger false``: the LearningRateMonitor of configs/train.yaml would stop the run after the sanity
    check ("Cannot use `LearningRateMonitor` callback with `Trainer` that has no logger"), and a list item cannot be
    taken out of trainer.callbacks on the command line; it logs nothing without a logger, so it is left out, with a
    line that says so."""
    if trainer.loggers:
        return
    monitors = [cb for cb in trainer.callbacks if isinstance(cb, LearningRateMonitor)]
    if monitors:
        trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, LearningRateMonitor)]
        rank_zero_info("trainer.logger is off: the LearningRateMonitor callback is left out (it logs only to a logger)")


def ints_before_floats(parser, prefix: str) -> None:
    """``--trainer.limit_val_batches 1`` is one batch, not 100%. The Trainer declares these Optional[Union[int, float]],
    but Python's typing cache can hand it an equal Union created first elsewhere as Union[float, int, None]
    (Lightning-AI/pytorch-lightning#21259), and jsonargparse tries the members in order: a typed or YAML 1 became
    1.0, i.e. every batch. Where a float member comes before int, put int first (a flat Union[...] is cached by its
    ordered members, so it keeps our order)."""
    for action in parser._actions:
        hint = getattr(action, "_typehint", None)
        if not action.dest.startswith(prefix) or typing.get_origin(hint) is not typing.Union:
            continue
        members = typing.get_args(hint)
        if float in members and int in members and members.index(float) < members.index(int):
            action._typehint = typing.Union[(int,) + tuple(m for m in members if m is not int)]  # noqa: UP007 (built from a tuple)


# LightningCLI's own optimizer options; ours trains with AdamW groups and model.schedule
LIGHTNING_OPTIMIZER_KEYS = ("optimizer", "lr_scheduler")


def not_our_optimizer(key: str) -> UserError:
    return UserError(f"--{key} is not used by lightning-mamba: the module trains with AdamW and its own schedule; set "
                     f"--model.lr, --model.weight_decay, --model.betas, --model.schedule, --model.warmup_steps, "
                     f"--model.decay_fraction, --model.min_lr_ratio instead")


def check_steps_left(config: Namespace, step: int) -> None:
    """A fit whose trainer.max_steps is already reached (0 for a new run, or a resume's checkpoint step) would train
    nothing and print a summary as if it had: refuse it with the number to give."""
    max_steps = (config.get("trainer") or Namespace()).get("max_steps")
    if not isinstance(max_steps, int) or max_steps < 0 or max_steps > step:
        return
    if step == 0:
        raise SettingError(f"trainer.max_steps={max_steps} trains nothing: give a number of steps > 0 (or -1 to "
                           f"train for trainer.max_epochs)")
    raise SettingError(f"checkpoint {config.ckpt_path} is at step {step}, so trainer.max_steps={max_steps} trains "
                       f"nothing more: give more than {step} (e.g. --trainer.max_steps {2 * step})")


def data_settings(config: Namespace) -> Namespace:
    """The data module's settings, whether the config names its class (class_path + init_args) or not."""
    return config.data.init_args if config.data.get("class_path") else config.data


def apply_pretrained(config: Namespace, argv: list[str]) -> list[str]:
    """--model.pretrained: the run's model settings become the checkpoint's (a typed one that differs is refused) and
    its data.seq_len the one the checkpoint was trained at unless typed (checkpoint_io.settle_pretrained). Returns
    the lines to print once the weights are loaded."""
    data = data_settings(config)
    typed = {k for k in typed_options(argv) if k.startswith(("model.", "data."))}
    passing = bool(data.get("state_passing")) or config.model.get("initial_state") == "passed"
    model, data_updates, lines = settle_pretrained(str(config.model.pretrained), config.model.as_dict(),
                                                   data.as_dict(), typed, passing)
    for key, value in model.items():
        config.model[key] = value
    for key, value in data_updates.items():
        data[key] = value
    return lines


def resume_into_run_directory(config: Namespace) -> None:
    """``fit --ckpt_path <save_dir>/<name>/version_<n>/checkpoints/last.ckpt`` goes on in that run directory: the
    TensorBoard logger's version is set to n (unless one was given), so events, config and checkpoints stay in one
    place and ModelCheckpoint keeps its state. Other loggers (CSVLogger would delete the run's metrics.csv) log to a
    new version, and a line says why."""
    path = os.path.abspath(str(config.ckpt_path))
    checkpoints = os.path.dirname(path)
    run = os.path.dirname(checkpoints)
    match = re.fullmatch(r"version_(\d+)", os.path.basename(run))
    logger = config.trainer.get("logger")
    if match is None or os.path.basename(checkpoints) != "checkpoints" or not isinstance(logger, Namespace):
        return
    init = logger.get("init_args") or Namespace()
    save_dir, name = init.get("save_dir"), init.get("name", "lightning_logs")
    if save_dir is None or init.get("version") is not None or not name:
        return
    if os.path.abspath(os.path.join(str(save_dir), str(name))) != os.path.dirname(run):
        return  # another run's checkpoint (e.g. a fine-tune's start): a new version of this run's name
    if str(logger.get("class_path", "")).rsplit(".", 1)[-1] != "TensorBoardLogger":
        rank_zero_info(f"resuming from {config.ckpt_path}: the logs go to a new version of {name}, not to {run} "
                       f"(only the TensorBoardLogger appends to a run's directory; this logger would overwrite it)")
        return
    init.version = int(match.group(1))
    logger.init_args = init
    # ModelCheckpoint warns that this run's checkpoints folder "exists and is not empty": going on there is the point
    warnings.filterwarnings("ignore", message=rf"Checkpoint directory .*{re.escape(checkpoints)} exists and is not empty")


def fit_summary(trainer: L.Trainer) -> list[str]:
    """The lines printed at the end of ``fit``: run directory, last checkpoint, final val loss, the forgetting verdict
    of the last length-generalization evaluation."""
    logger = trainer.loggers[0] if trainer.loggers else None
    run_dir = (logger.log_dir if logger is not None else None) or trainer.default_root_dir
    ckpt = next((cb.last_model_path or cb.best_model_path for cb in trainer.checkpoint_callbacks
                 if isinstance(cb, ModelCheckpoint) and (cb.last_model_path or cb.best_model_path)), None)
    val = trainer.callback_metrics.get("val/loss")
    # callbacks of higher layers (the forgetting verdict's) add their lines: summary_line(), asked by name
    extra = [cb.summary_line() for cb in trainer.callbacks if callable(getattr(cb, "summary_line", None))]
    return [
        f"fit done at step {trainer.global_step}",
        f"  run directory:   {os.path.relpath(run_dir) if run_dir else 'none'}",
        f"  last checkpoint: {os.path.relpath(ckpt) if ckpt else 'none (checkpointing is off)'}",
        f"  final val loss:  {float(val):.4f}" if val is not None else "  final val loss:  none (no validation ran in this process)",
        *(f"  {line}" for line in extra or ["forgetting:      not evaluated (no LengthGeneralizationCallback)"]),
    ]


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


def quiet_lightning() -> None:
    """Off by default: Lightning's litlogger advertisement and torch's ``LeafSpec`` deprecation warning (raised by
    Lightning's own code, printed into the progress bar); neither is about the run."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in log.filters):
            log.addFilter(_DropTips())


class SettingsOnlyCLI(MambaCLI):
    """The CLI's parse and its checks of the settings, with nothing built: the model's shape is checked as its
    config (no weights allocated). A sweep asks it of every row of its grid before the first cell trains."""

    def instantiate_classes(self) -> None:
        model = self.config.get("model") or Namespace()
        if not model.get("pretrained"):  # (a pretrained model's shape is its file's, checked when it loads)
            model_config(**model.as_dict())


def lightning_cli(args=None, run: bool = True, description: str = "Train and study Mamba-2 LMs.",
                  cli_class: type[MambaCLI] = MambaCLI) -> MambaCLI:
    quiet_lightning()
    return cli_class(
        MambaLitModule,
        TextDataModule,
        subclass_mode_data=True,  # TextDataModule by default; experiments may pick e.g. PasskeyDataModule
        save_config_kwargs={"overwrite": True},
        # run=False (a sweep's cells) parses fit's options with no subcommand: its errors point at fit's --help
        parser_kwargs={"description": description, **({} if run else {"prog": "lightning-mamba fit"})},
        parser_class=OneLineErrorParser,  # an argument error is one line, not the usage first
        args=args,
        run=run,
    )
