"""Checks of ``lightning-mamba fit|validate|test|predict`` before anything runs, each ending in one line that says
what to change (``lightning_mamba.cli`` prints it as ``error: ...``): argument errors without the usage dump, a
config file that is not text, Trainer settings Lightning would answer with a traceback, output folders that cannot
be written, a fresh run into another run's directory, and a full disk named by the file and the setting."""

from __future__ import annotations

import math
import os
import re
import sys
from typing import Any, NoReturn

from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser

from ..atomic import unwritable_dir
from ..errors import DiskFullError, UserError, is_disk_full
from .nan_guard import MODES as NAN_GUARD_MODES


class SettingError(UserError, ValueError):
    """A fit/validate/test setting that cannot work; one line that names it and what to change."""


def user_error(e: BaseException) -> BaseException | None:
    """The user-facing error (bad setting, non-finite step) behind ``e`` (jsonargparse wraps errors raised while instantiating classes)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, (UserError, MisconfigurationException)):
            return e
        if isinstance(e, ModuleNotFoundError) and str(e).startswith("Requirement "):
            # Lightning's accelerators, strategies and precisions name the package they lack, e.g. tpu -> torch_xla
            return ModuleNotFoundError(f"{e} (needed by the chosen trainer.accelerator, trainer.strategy or trainer.precision)")
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


# ---- argument errors: one line, not the usage ------------------------------------------------------------------
class OneLineErrors:
    """For a jsonargparse ``ArgumentParser`` (mixed in before it): jsonargparse prints the whole usage (~75 lines for
    fit) before the line that matters, which is itself several lines for a bad value; this prints the error as one
    line and a hint where the options are listed, and exits with status 2. Abbreviated options are refused: argparse
    would take the typo ``--model.d_stat 3`` for ``--model.d_state 3`` and train that model."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        from jsonargparse._common import debug_mode_active  # where jsonargparse keeps it (JSONARGPARSE_DEBUG)

        if not self.exit_on_error or debug_mode_active():
            super().error(message, ex)  # raises: jsonargparse parses unions and subcommands by trying
        parser = getattr(ex, "subcommand_parser", None) or self
        self._logger.error(message)
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {one_line(message)}\n  (the options: `{prog} --help`)\n")
        sys.exit(2)


class OneLineErrorParser(OneLineErrors, LightningArgumentParser):
    """LightningCLI's parser (fit, validate, ...) with one-line argument errors."""


_KEY = re.compile(r'^Parser key "([^"]+)":$')
_KEY_FIRST = re.compile(r'^Parser key "([^"]+)":')


def one_line(message: str) -> str:
    """A jsonargparse error message (often an indented tree: a union's alternatives, a class's nested key) in one
    line: the innermost problem under the full key, e.g. ``data.batch_size: expected an int, got 'many'``."""
    raw = [line for line in str(message).rstrip().splitlines() if line.strip()]
    lines = [line.strip() for line in raw]
    if len(lines) <= 1:
        m = re.fullmatch(r'Parser key "([^"]+)": (.*)', lines[0]) if lines else None
        return f"{m.group(1)}: {_readable(m.group(2))}" if m else (lines[0] if lines else "invalid arguments")
    keys = []
    for line in lines:
        if not _KEY.match(line):
            break
        keys.append(_KEY.match(line).group(1))
    key = ".".join(keys)
    for i, line in enumerate(lines):
        if line.startswith("- Problem with given class_path"):
            # the class alternative of a union (data: the data module | None): its own error is what was meant
            indent = len(raw[i]) - len(raw[i].lstrip())
            block = raw[i + 1:]
            end = next((j for j, r in enumerate(block) if len(r) - len(r.lstrip()) <= indent), len(block))
            inner = one_line("\n".join(block[:end]))
            return f"{key}.{inner}" if key and _KEY_FIRST.match(block[0].strip()) else (
                f"{key}: {inner}" if key else inner)
    rest = lines[len(keys):]
    expected, given = [], None
    for line in rest:
        if line.startswith("Given value:"):
            given = line.split(":", 1)[1].strip()
        elif line.startswith(("- Expected a ", "Expected a ")):
            wanted, _, got = line.removeprefix("- ").removeprefix("Expected a ").partition(". Got value: ")
            expected.append(_type_name(wanted))
            given = repr(got) if got else given
    if expected:
        text = f"expected {' or '.join(expected)}, got {given}"
    else:
        text = _readable(rest[0]) if rest else "invalid value"
    return f"{key}: {text}" if key else text


def _type_name(t: str) -> str:
    t = re.sub(r"<class '([\w.]+)'>", lambda m: m.group(1).rsplit(".", 1)[-1], t.strip())
    m = re.fullmatch(r"typing\.Literal\[(.*)\]", t)
    return f"one of {m.group(1)}" if m else ("null" if t == "NoneType" else f"{'an' if t[:1] in 'aeiou' else 'a'} {t}")


def _readable(detail: str) -> str:
    m = re.fullmatch(r"Expected a (.+?)\. Got value: (.*)", detail)
    if m:
        return f"expected {_type_name(m.group(1))}, got {m.group(2)!r}"
    return _type_name(detail) if detail.startswith("<class") else detail


def config_files(argv: list[str]) -> list[str]:
    """The files given with ``--config``/``-c`` in ``argv``."""
    out = []
    for i, a in enumerate(argv):
        if a in ("--config", "-c") and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif a.startswith("--config="):
            out.append(a.split("=", 1)[1])
    return out


def typed_options(argv: list[str]) -> set[str]:
    """The options typed in ``argv`` as dotted keys, without ``--``, ``.init_args`` or ``=value``:
    ``--model.init_args.lr=1e-3`` -> ``model.lr`` (what was typed, as opposed to what a config file gave)."""
    return {re.sub(r"^--|\.init_args|=.*$", "", a) for a in argv if a.startswith("--") and len(a) > 2}


def not_text_config(argv: list[str], error: UnicodeDecodeError) -> SettingError:
    """The one line for a config file that is not UTF-8 text (jsonargparse fails with a UnicodeDecodeError)."""
    for path in config_files(argv):
        try:
            with open(path, "rb") as f:
                f.read().decode("utf-8")
        except UnicodeDecodeError as e:
            return SettingError(f"--config {path} is not a text file (byte {e.object[e.start]:#04x} at offset "
                                f"{e.start} is not UTF-8): give a YAML config file")
        except OSError:
            continue
    return SettingError(f"a config file is not UTF-8 text ({error.reason} at offset {error.start}): give YAML files")


# ---- a config file of another kind -----------------------------------------------------------------------------
RUN_KEYS = ("seed_everything", "trainer", "model", "data", "nan_guard", "ckpt_path", "fit", "validate", "test", "predict")
STUDY_KEYS = ("states", "lens", "models", "tokens_per_cell", "base_config", "model_overrides")
TEMPLATE_KEYS = ("instruction", "filler", "needle", "question", "answer")


def config_mapping(path: str) -> dict | None:
    """The top-level mapping of a YAML file, or None where it cannot be read as one (jsonargparse then says why)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def check_config_kinds(argv: list[str], groups: dict[str, type]) -> None:
    """The ``--config`` files of fit/validate/test/predict are whole run configs (configs/train.yaml, a run's
    config.yaml) or overlays stacked after one (configs/experiment/). jsonargparse answers a file of another kind
    with an option it does not accept, or a logger it cannot build: say which kind it is and where it goes.
    ``groups``: argument group -> the class whose parameters it takes (a configs/model/ file is ``--model FILE``)."""
    import inspect

    logger = "trainer.logger" in typed_options(argv)  # a config file or the command line gave trainer.logger a class
    for path in config_files(argv):
        data = config_mapping(path)
        if not data:
            continue
        keys = set(data)
        if keys & set(RUN_KEYS):
            trainer = data.get("trainer") if isinstance(data.get("trainer"), dict) else {}
            given = trainer.get("logger")
            if isinstance(given, dict) and "class_path" not in given and not logger:
                raise SettingError(f"--config {path} is an overlay (its trainer.logger names no class): give it after "
                                   f"a whole run config, e.g. --config configs/train.yaml --config {path}")
            logger = logger or (isinstance(given, dict) and "class_path" in given) or isinstance(given, list)
            continue
        if keys & set(STUDY_KEYS):
            raise SettingError(f"--config {path} is a study file: run it with `lightning-mamba sweep --config {path}`")
        if keys <= set(TEMPLATE_KEYS):
            raise SettingError(f"--config {path} is a passkey template: give it as --data.passkey_template {path} "
                               f"(with a PasskeyDataModule, e.g. configs/experiment/passkey.yaml), or to "
                               f"`lightning-mamba passkey --template {path}`")
        for group, cls in groups.items():
            if keys <= set(inspect.signature(cls).parameters):
                raise SettingError(f"--config {path} holds {group} settings only: give it as --{group} {path}, after "
                                   f"a whole run config (e.g. --config configs/train.yaml --{group} {path})")
    # a logger's own option with no logger class anywhere: jsonargparse said "trainer.logger: expected a bool or
    # null, got NestedArg(key='name', val='foo')" (Lightning's default logger is True, which takes no options)
    # A --config that is no file (a typo'd path, or YAML given inline) may name the class: jsonargparse says why
    # it cannot be read (a missing base_config of a sweep read "no logger class", not "File does not exist")
    nested = [a.split("=", 1)[0] for a in argv if a.startswith("--trainer.logger.")]
    if nested and not logger and all(os.path.isfile(path) for path in config_files(argv)):
        raise SettingError(f"{nested[0]}: no logger class to take it: give a run config first (--config "
                           f"configs/train.yaml, whose logger is TensorBoard) or the class (--trainer.logger "
                           f"TensorBoardLogger)")


# ---- settings Lightning answers with a traceback -----------------------------------------------------------------
def check_settings(config: Namespace) -> None:
    """Trainer and model settings checked before anything is built: unknown accelerator or strategy names,
    ``val_check_interval`` 0, ``accumulate_grad_batches`` < 1, an unknown ``nan_guard.on_nonfinite``, a non-finite
    ``model.lr``."""
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    trainer = config.get("trainer") or Namespace()
    accelerator = trainer.get("accelerator")
    names = ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())]
    if isinstance(accelerator, str) and accelerator.lower() not in names:
        raise SettingError(f"trainer.accelerator={accelerator!r} is unknown: use one of {', '.join(names)}")
    strategy = trainer.get("strategy")
    names = ["auto", *StrategyRegistry.available_strategies()]
    if isinstance(strategy, str) and strategy.lower() not in names:
        raise SettingError(f"trainer.strategy={strategy!r} is unknown: use one of {', '.join(names[:8])}, ... "
                           f"(Lightning's StrategyRegistry), or a class_path")
    interval = trainer.get("val_check_interval")
    if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval == 0:
        # Lightning refuses a negative one, but divides by 0 mid-run (after making the run directory)
        raise SettingError(f"trainer.val_check_interval must be > 0 (got {interval}): N validates every N training "
                           f"batches; to turn validation off set trainer.limit_val_batches 0")
    accumulate = trainer.get("accumulate_grad_batches")
    if accumulate is not None and (isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1):
        raise SettingError(f"trainer.accumulate_grad_batches must be an integer >= 1 (got {accumulate!r}): 1 updates "
                           f"after every batch")
    mode = (config.get("nan_guard") or Namespace()).get("on_nonfinite")
    if mode is not None and mode not in NAN_GUARD_MODES:
        raise SettingError(f"nan_guard.on_nonfinite={mode!r} is unknown: use {' or '.join(map(repr, NAN_GUARD_MODES))}")
    model = config.get("model") or Namespace()
    model = model.get("init_args") or model
    lr = model.get("lr")
    if isinstance(lr, (int, float)) and not math.isfinite(lr):
        raise SettingError(f"model.lr must be a finite number > 0 (got {lr})")


def check_one_of_each_callback(callbacks) -> None:
    """Two callbacks that keep their state in the checkpoint under the same key (two experiment overlays that both
    append a PasskeyEvalCallback, a ``--trainer.callbacks+=`` of one the config already has): Lightning stops with a
    traceback when the Trainer is built; say which one, and what to drop."""
    from lightning.pytorch import Callback
    from lightning.pytorch.utilities.model_helpers import is_overridden

    seen: dict = {}
    for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
        if not isinstance(cb, Callback) or not is_overridden("state_dict", instance=cb, parent=Callback):
            continue
        if cb.state_key in seen:
            name = type(cb).__name__
            raise SettingError(f"trainer.callbacks holds two {name} that a checkpoint cannot tell apart (it keeps "
                               f"one state per callback): keep one (two config files that both add it, e.g. two "
                               f"experiment overlays, or a --trainer.callbacks+={name} over a config that has one: "
                               f"set that one's init_args in a config file instead)")
        seen[cb.state_key] = cb


# ---- where the run writes --------------------------------------------------------------------------------------
def check_output_folders(trainer) -> None:
    """The loggers' and checkpoints' folders must take files: say which setting to change, before training."""
    for logger in trainer.loggers:
        save_dir = getattr(logger, "save_dir", None)
        why = unwritable_dir(str(save_dir)) if save_dir else None
        if why:
            raise SettingError(f"the logger's save_dir {save_dir} is not a writable folder ({why}): set "
                               f"trainer.logger.init_args.save_dir to one")
    for cb in trainer.checkpoint_callbacks:
        dirpath = getattr(cb, "dirpath", None) if isinstance(cb, ModelCheckpoint) else None
        why = unwritable_dir(str(dirpath)) if dirpath and "://" not in str(dirpath) else None
        if why:
            raise SettingError(f"the checkpoint folder {dirpath} is not writable ({why}): set ModelCheckpoint's "
                               f"dirpath (trainer.callbacks) to a writable folder")


def check_fresh_log_version(trainer, config: Namespace) -> None:
    """A fit with an explicit logger version whose folder already holds a run would delete that run's metrics
    (CSVLogger deletes metrics.csv, even on a resume) or mix two runs in one place (TensorBoard, unless it is a resume
    of that run with --ckpt_path): refuse it."""
    from lightning.pytorch.loggers import CSVLogger

    loggers = config.trainer.get("logger")
    for i, logger in enumerate(loggers if isinstance(loggers, list) else [loggers]):
        if not isinstance(logger, Namespace) or i >= len(trainer.loggers):
            continue
        version = (logger.get("init_args") or Namespace()).get("version")
        csv = isinstance(trainer.loggers[i], CSVLogger)
        # version '' is the name's own folder: a sweep cell's config.yaml (the sweep trains it without this check)
        if version is None or (config.get("ckpt_path") and not csv):
            continue  # the next free version; a resume that appends
        log_dir = getattr(trainer.loggers[i], "log_dir", None)
        if log_dir and os.path.isdir(log_dir) and os.listdir(log_dir):
            why = ("the CSVLogger would delete its metrics.csv" if csv else "a new run would mix its logs with that "
                   "run's")
            raise SettingError(f"the logger's version {version!r} already holds a run ({log_dir} is not empty) and "
                               f"{why}: choose another trainer.logger.init_args.version (or null for the next free "
                               f"one) or another name or save_dir" + ("" if csv else ", or resume that run with --ckpt_path"))


def disk_full(e: BaseException, trainer) -> DiskFullError | None:
    """A full disk anywhere behind ``e`` as one line naming the file and the setting that moves it (the checkpoint
    folder, the logger's save_dir), or None."""
    seen = set()
    while e is not None and id(e) not in seen and not is_disk_full(e):
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    if e is None or id(e) in seen:
        return None
    if isinstance(e, DiskFullError):
        return e
    path, frames = getattr(e, "filename", None), _frames(e)
    if str(path).endswith(".ckpt") or any(f.endswith(("checkpoint_io.py", "model_checkpoint.py")) for f in frames):
        return DiskFullError(path or "a checkpoint", "ModelCheckpoint's dirpath (trainer.callbacks)")
    if any(f"{os.sep}loggers{os.sep}" in f for f in frames):
        logger = trainer.loggers[0] if trainer is not None and trainer.loggers else None
        where = path or f"the logs in {getattr(logger, 'log_dir', None) or 'the run directory'}"
        return DiskFullError(where, "trainer.logger.init_args.save_dir")
    return DiskFullError(path or "a file of the run")


def _frames(e: BaseException) -> list[str]:
    tb, out = e.__traceback__, []
    while tb is not None:
        out.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    return out


def run_guarded(run: Any, trainer) -> Any:
    """``run()``, with a full disk reported as one line (:func:`disk_full`)."""
    try:
        return run()
    except (OSError, RuntimeError) as e:
        full = disk_full(e, trainer)
        if full is None or full is e:
            raise
        raise full from e
