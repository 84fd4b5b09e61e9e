"""The forgetting study as a list of cells: one model per (STATE, LEN), same token budget, same everything else.

A cell trains through the path a user's run takes (``lightning_cli(args, run=False)`` from the base config plus
the study's overrides, then ``trainer.fit``), so its run directory ``<out>/cells/<cell>/`` holds a normal
``config.yaml``, TensorBoard events and ``checkpoints/last.ckpt``. The final model is then evaluated in fp32 on
held-out text to ``eval_multiple x LEN`` positions (or ``eval_tokens``; at least ``eval_min_tokens``) and judged
with the paper's criterion; ``result.json`` (written atomically) marks the cell done. Re-running skips done cells
and resumes a killed one from its ``last.ckpt``. ``shard="i/n"`` keeps cells k with k % n == i: one process per GPU
or node. With ``seeds`` every (STATE, LEN) is trained once per seed (cells ``<row>_len<LEN>_seed<s>``): GPU training
is not bitwise deterministic, and a marginal onset can show in one run and not in its rerun.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..analysis.criterion import bucket_problem, threshold_problem, verdict_word
from ..analysis.forgetting import DEFAULT_EVAL_ROWS, DEFAULT_MAX_MULTIPLE
from ..atomic import atomic_write_json, file_in_the_way
from ..errors import UserError


class SweepError(UserError, ValueError):
    """A study setting that cannot work; the message says what to change."""


@dataclass
class Study:
    """A T_forget study: the grid, the budget, the evaluation and where it all goes.

    Args:
        states: STATE axis: the d_state values (one model per state and length).
        lens: LEN axis: the training lengths in tokens.
        models: The paper's axis instead of d_state: a list of model overrides, e.g. {n_layer: 12, d_model: 768}
            (an optional key 'name' names the row). When given, ``states`` is not used.
        tokens_per_cell: Training budget of every cell in tokens (steps = tokens_per_cell // tokens_per_batch).
            The paper's failure needs much more training than small pilots get (see docs/study.md).
        tokens_per_batch: Tokens per optimizer step, the same for every cell: batch size = tokens_per_batch / LEN
            (split over the devices when a cell trains on several). Must be a multiple of every LEN.
        eval_multiple: Evaluate each model to eval_multiple x LEN positions.
        eval_tokens: Evaluate to this many positions instead (e.g. 1048576, the paper's 1M); null: eval_multiple.
        eval_min_tokens: A floor on the evaluated length, in tokens: every cell is evaluated to at least this many
            positions (max(eval_multiple x LEN, eval_min_tokens)), at the end and, through the cell's
            LengthGeneralizationCallback(s) (their min_length), along training. At a small LEN, 64 x LEN is short and a
            slow rise crosses the 2x line only further out. null: no floor (the callbacks keep the base config's).
        eval_n_rows: Held-out rows (prompts) averaged; the paper used 128.
        bucket: Positions per bucket of the criterion's curve, at most half the smallest LEN; null: LEN // 8
            (at least 16, at most LEN // 2).
        threshold: The paper's criterion: fails if a bucket exceeds threshold x the max within LEN.
        passkey: Also score passkey retrieval (lengths passkey_multiples x LEN) for T_recall.
        passkey_multiples: Passkey prompt lengths in units of LEN.
        passkey_depths: Evenly spaced needle depths (i + 0.5) / n.
        passkey_samples: Keys per (length, depth) cell.
        passkey_template: A YAML file of the prompt's text (instruction, filler, needle, question, answer); null: the
            paper's English template. configs/passkey/code.yaml is the code-form one for models trained on code.
        out: The study directory: cells/, results.csv, summary.json, figures, summary/ (TensorBoard).
        base_config: LightningCLI config file(s) every cell starts from (as `lightning-mamba fit --config`).
        model_overrides: model.* settings applied to every cell (e.g. {d_model: 256, n_layer: 4}). On the command
            line after --config, each of the three *_overrides is merged into the config's (a key given as null is
            removed).
        data_overrides: data.* settings applied to every cell (seq_len and batch_size are the study's).
        trainer_overrides: trainer.* settings applied to every cell (max_steps, precision, logger are the study's).
        time_per_cell: A training time budget for every cell in each run of the command, DD:HH:MM:SS (Lightning's
            max_time), e.g. 00:01:00:00: a cell stops there with last.ckpt at that step (its evaluations along
            training give the summary a provisional verdict), the sweep goes on to the next, and running the same
            command again resumes the stopped ones for another time_per_cell each. null: no budget.
        precision: Training precision of every cell; auto: bf16-mixed on CUDA, else 32-true.
        shard: 'i/n': run only cells k with k % n == i (one process per GPU or node; see docs/study.md).
        seed: seed_everything of every cell (when seeds is null).
        seeds: Replicates: train every (STATE, LEN) once per seed in this list (cells <row>_len<LEN>_seed<s>, each
            with seed_everything s: the initialization; data.seed, which fixes the held-out split and the batches,
            stays the same); the cost is x len(seeds); the summary takes each LEN's majority verdict. null: one run
            per cell, with seed. Leave seed at 0 when giving seeds.
        piece_len: Evaluation: tokens per forward (the state is carried, memory stays constant).
        eval_batch_size: Evaluation: rows per forward.
        device: Evaluation device; null: the one the cell trained on (cuda when available, else cpu).
        cells: Run only these cells of the grid, by name (state2048_len32; with seeds state2048_len32_seed1), in this
            order, which is also the order the shards take them in: to fill the gaps of a grid, or to start the
            costly cells first. null: the whole grid, row by row.
    """

    states: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    lens: list[int] = field(default_factory=lambda: [128, 256, 512, 1024, 2048])
    models: list[dict] | None = None
    tokens_per_cell: int = 2**25
    tokens_per_batch: int = 2**16
    eval_multiple: int = DEFAULT_MAX_MULTIPLE
    eval_tokens: int | None = None
    eval_min_tokens: int | None = None
    eval_n_rows: int = DEFAULT_EVAL_ROWS
    bucket: int | None = None
    threshold: float = 2.0
    passkey: bool = False
    passkey_multiples: list[float] = field(default_factory=lambda: [0.5, 1, 2, 4, 8, 16])
    passkey_depths: int = 5
    passkey_samples: int = 4
    passkey_template: str | None = None
    out: str = "runs/study/forget_threshold"
    base_config: list[str] = field(default_factory=lambda: ["configs/train.yaml"])
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data_overrides: dict[str, Any] = field(default_factory=dict)
    trainer_overrides: dict[str, Any] = field(default_factory=dict)
    time_per_cell: str | None = None
    precision: str = "auto"
    shard: str = "0/1"
    seed: int = 0
    seeds: list[int] | None = None
    piece_len: int = 2048
    eval_batch_size: int = 8
    device: str | None = None
    cells: list[str] | None = None

    @property
    def axis(self) -> str:
        return "models" if self.models else "states"

    @property
    def steps(self) -> int:
        return self.tokens_per_cell // self.tokens_per_batch

    def eval_length(self, seq_len: int) -> int:
        """Positions each cell of length ``seq_len`` is evaluated to at the end."""
        return max(self.eval_tokens or self.eval_multiple * seq_len, self.eval_min_tokens or 0)

    def validate(self) -> None:
        check(self.models is None or bool(self.models), "models is an empty list: give at least one model override, "
              "e.g. [{n_layer: 12, d_model: 768}], or models: null to sweep states")
        check(bool(self.lens) and all(t >= 2 for t in self.lens),
              f"lens must be non-empty, each >= 2 (got {self.lens})")
        if self.axis == "states":
            check(bool(self.states) and all(n >= 1 for n in self.states), f"states must be non-empty, each >= 1 "
                  f"(got {self.states})")
            check("d_state" not in self.model_overrides, "model_overrides.d_state conflicts with states: remove one")
        check(type(self.tokens_per_batch) is int and self.tokens_per_batch >= 1, f"tokens_per_batch must be a positive "
              f"number of tokens per optimizer step, e.g. {math.lcm(*self.lens)} (got {self.tokens_per_batch!r})")
        bad = [t for t in self.lens if self.tokens_per_batch % t]
        check(not bad, f"tokens_per_batch={self.tokens_per_batch} must be a multiple of every LEN (not of {bad}), so "
              f"every cell sees the same tokens per step: use e.g. {math.lcm(*self.lens)}")
        check(self.steps >= 1, f"tokens_per_cell={self.tokens_per_cell} is less than one step of "
              f"tokens_per_batch={self.tokens_per_batch}")
        for name in ("eval_n_rows", "passkey_depths", "passkey_samples", "piece_len", "eval_batch_size"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1 (got {getattr(self, name)})")
        check(self.eval_min_tokens is None or (type(self.eval_min_tokens) is int and self.eval_min_tokens >= 1),
              f"eval_min_tokens must be a positive number of tokens, e.g. 32768, or null (got {self.eval_min_tokens!r})")
        check(self.eval_length(max(self.lens)) > max(self.lens), "the evaluation must go past LEN: use "
              f"eval_multiple >= 2 or eval_tokens > {max(self.lens)}")
        problem = None if self.bucket is None else bucket_problem(self.bucket, min(self.lens))
        check(problem is None, f"bucket {problem} (the smallest LEN)")
        problem = threshold_problem(self.threshold)
        check(problem is None, f"threshold {problem}")
        check(not self.passkey or (bool(self.passkey_multiples) and all(m > 0 for m in self.passkey_multiples)),
              f"passkey_multiples must be a non-empty list of positive multiples of LEN, e.g. [0.5, 1, 2, 4, 8, 16] "
              f"(got {self.passkey_multiples}), or passkey: false")
        check(self.passkey_template is None or os.path.isfile(self.passkey_template), f"passkey_template "
              f"{self.passkey_template} does not exist: give a YAML file like configs/passkey/code.yaml, or null")
        for key, what in (("seq_len", "lens"), ("batch_size", "tokens_per_batch")):
            check(key not in self.data_overrides, f"data_overrides.{key} is set by the study ({what}): remove it")
        for key, what in (("max_steps", "tokens_per_cell"), ("precision", "precision"), ("logger", "out")):
            check(key not in self.trainer_overrides, f"trainer_overrides.{key} is set by the study ({what}): remove it")
        check(self.time_per_cell is None or "max_time" not in self.trainer_overrides, "time_per_cell and "
              "trainer_overrides.max_time both set a cell's time budget: keep one")
        check(self.time_per_cell is None or re.fullmatch(r"\d+:\d\d:\d\d:\d\d", str(self.time_per_cell)) is not None,
              f"time_per_cell must be DD:HH:MM:SS, e.g. 00:01:00:00 for an hour (got {self.time_per_cell!r})")
        shard_of(self.shard)
        if self.seeds is not None:
            check(bool(self.seeds) and all(type(s) is int and s >= 0 for s in self.seeds), f"seeds must be a "
                  f"non-empty list of non-negative ints, e.g. [0, 1, 2] (got {self.seeds}), or null for one run per cell")
            check(len(set(self.seeds)) == len(self.seeds), f"seeds {self.seeds} repeat a seed: give each once")
            check(self.seed == 0, f"seed={self.seed} and seeds={self.seeds} are both set: with seeds every cell trains "
                  f"once per seed in seeds; leave seed at 0 (its default)")
        names = [c.name for c in grid_cells(self)]
        check(len(set(names)) == len(names), f"two cells share a name ({names}): give each model a distinct 'name'")
        if self.cells is not None:
            unknown = [c for c in self.cells if c not in names]
            check(bool(self.cells) and not unknown, f"cells {unknown or self.cells} are not cells of this grid: name "
                  f"some of {', '.join(names)}, or give cells: null for the whole grid")
            check(len(set(self.cells)) == len(self.cells), f"cells {self.cells} name a cell twice: give each once")


def check(ok: bool, message: str) -> None:
    if not ok:
        raise SweepError(message)


def check_device(device: str | None) -> None:
    """The evaluation device, checked before any cell trains (it is first used after the first cell's training)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SweepError(f"device={device!r} is not a torch device: give cpu, cuda or cuda:<i>, or null (the one "
                         f"the cells train on)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise SweepError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s): give cpu, "
                         f"another index, or null (the one the cells train on)")


def check_out(out: str) -> None:
    """The study folder must be a folder, checked before anything is written there (and without making it: a study
    refused later leaves none): an --out that names a file read "[Errno 20] Not a directory: 'README.md/cells'"."""
    path = file_in_the_way(out)
    if path is not None:
        raise SweepError(f"out={out!r} is not a folder ({path} is a file): give --out a folder, e.g. "
                         f"runs/study/forget_threshold")


def shard_of(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not int(m[2]) >= 1 or not int(m[1]) < int(m[2]):
        raise SweepError(f"shard={text!r} must be 'i/n' with 0 <= i < n, e.g. 0/4 (SLURM: "
                         f"$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return int(m[1]), int(m[2])


# ---- cells ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    row: str  # the axis value as a name: state16, or the model's name
    seq_len: int
    model: tuple  # the cell's own model overrides, as sorted (key, value) pairs
    seed: int | None = None  # a replicate's seed (Study.seeds); None: the study's one seed

    @property
    def name(self) -> str:
        return f"{self.row}_len{self.seq_len}" + ("" if self.seed is None else f"_seed{self.seed}")


CELL_NAME = re.compile(r"(.+)_len(\d+)(?:_seed(\d+))?")


def parse_cell_name(name: str) -> tuple[str, int, int | None] | None:
    """``Cell.name`` back to (row, LEN, seed or None); None for a name that is not a cell's."""
    m = CELL_NAME.fullmatch(name)
    return None if m is None else (m[1], int(m[2]), None if m[3] is None else int(m[3]))


def state_of_row(row: str) -> int | None:
    """The d_state a row of the states axis is named for (``state<n>``, :func:`make_cells`); None for a model's row."""
    m = re.fullmatch(r"state(\d+)", row)
    return None if m is None else int(m[1])


def seed_of(name: str) -> int | None:
    """The replicate seed in a cell's name (``..._seed<s>``); None for a cell of a study without seeds."""
    parsed = parse_cell_name(name)
    return None if parsed is None else parsed[2]


def model_tag(spec: dict) -> str:
    if "name" in spec:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(spec["name"]))
    return "_".join(f"{k}{v}" for k, v in sorted(spec.items())) or "base"


def make_cells(study: Study) -> list[Cell]:
    """The cells this study runs: the whole grid (:func:`grid_cells`), or the ones ``study.cells`` names, in its
    order."""
    grid = grid_cells(study)
    if study.cells is None:
        return grid
    by_name = {c.name: c for c in grid}
    return [by_name[name] for name in study.cells if name in by_name]


def grid_cells(study: Study) -> list[Cell]:
    """The whole grid, row-major (rows: states or models; columns: lens; seeds innermost when given)."""
    if study.axis == "models":
        rows = [(model_tag(m), tuple(sorted((k, v) for k, v in m.items() if k != "name"))) for m in study.models]
    else:
        rows = [(f"state{n}", (("d_state", n),)) for n in study.states]
    seeds = [None] if study.seeds is None else study.seeds
    return [Cell(tag, int(t), spec, s) for tag, spec in rows for t in study.lens for s in seeds]


def training_seed(study: Study, cell: Cell) -> int:
    return study.seed if cell.seed is None else cell.seed


def shard_cells(cells: list[Cell], shard: str) -> list[Cell]:
    i, n = shard_of(shard)
    return [c for k, c in enumerate(cells) if k % n == i]


def cell_dir(study: Study, cell: Cell) -> str:
    return os.path.join(study.out, "cells", cell.name)


def _value(v: Any) -> str:
    """A value as the CLI parses it (YAML): strings as they are, the rest as JSON."""
    return v if isinstance(v, str) else json.dumps(v)


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16-mixed" if torch.cuda.is_available() else "32-true"
    return precision


def cell_args(study: Study, cell: Cell, world_size: int = 1) -> list[str]:
    """The LightningCLI arguments of a cell: what `lightning-mamba fit` would be given for it."""
    per_device = study.tokens_per_batch // cell.seq_len
    if per_device % world_size:
        raise SweepError(f"{cell.name}: a batch of {per_device} samples does not split over {world_size} devices: "
                         f"use a tokens_per_batch that is a multiple of {cell.seq_len * world_size}")
    args = [a for path in study.base_config for a in ("--config", path)]
    args += ["--seed_everything", str(training_seed(study, cell))]
    for k, v in {**study.model_overrides, **dict(cell.model)}.items():
        args += [f"--model.{k}", _value(v)]
    for k, v in study.data_overrides.items():
        args += [f"--data.{k}", _value(v)]
    args += ["--data.seq_len", str(cell.seq_len), "--data.batch_size", str(per_device // world_size)]
    for k, v in study.trainer_overrides.items():
        args += [f"--trainer.{k}", _value(v)]
    if study.time_per_cell is not None:
        args += ["--trainer.max_time", study.time_per_cell]
    args += ["--trainer.max_steps", str(study.steps), "--trainer.precision", resolve_precision(study.precision),
             "--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
             "--trainer.logger.init_args.save_dir", os.path.join(study.out, "cells"),
             "--trainer.logger.init_args.name", cell.name,
             "--trainer.logger.init_args.version", ""]  # events, config.yaml, checkpoints/ right in the cell's folder
    return args


# ---- running --------------------------------------------------------------------------------------------
def write_json(path: str, obj: Any) -> None:
    """JSON-safe (:func:`clean`) and atomic (a killed run leaves no half file)."""
    atomic_write_json(path, clean(obj), indent=1)


def clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def check_rows(study: Study, cells: list[Cell]) -> None:
    """Each row's cell arguments parsed and its model's settings checked, before any cell trains (a bad row of
    ``models`` was found only when its turn came, after the rows before it had trained)."""
    from ..training.cli import SettingsOnlyCLI, lightning_cli

    firsts = {}
    for cell in cells:
        firsts.setdefault(cell.model, cell)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended")
        for cell in firsts.values():
            lightning_cli(cell_args(study, cell), run=False, cli_class=SettingsOnlyCLI)


def build_cli(study: Study, cell: Cell):
    """The cell's LightningCLI (not run). A cell on several devices is built again with its batch split."""
    from lightning.pytorch.callbacks import Timer

    from ..training.cli import lightning_cli, quiet_lightning
    from ..training.stops import BudgetPerRun, CheckpointOnSigterm

    quiet_lightning()  # here, not only inside lightning_cli: catch_warnings below would undo its filters on exit
    with warnings.catch_warnings():  # "args and command line arguments": the command line is the sweep's
        warnings.filterwarnings("ignore", message=".*args parameter is intended")
        cli = lightning_cli(cell_args(study, cell), run=False)
        if cli.trainer.world_size > 1:
            cli = lightning_cli(cell_args(study, cell, cli.trainer.world_size), run=False)
    floor_lengthgen(cli, study.eval_min_tokens)
    if study.time_per_cell is not None:  # the budget counts each run of the command: re-running trains on
        configured = [cb.class_path for cb in cli.config.trainer.callbacks or [] if str(cb.class_path).endswith("Timer")]
        if configured:  # Lightning would ignore max_time beside it, and the swap below would drop it silently
            raise SweepError(f"time_per_cell and a {configured[0]} callback in the cells' config both set a time "
                             "budget: keep one (drop time_per_cell, or the Timer from the base config's callbacks)")
        cli.trainer.callbacks[:] = [BudgetPerRun(duration=study.time_per_cell, interval="step")
                                    if type(cb) is Timer else cb for cb in cli.trainer.callbacks]
    for cb in cli.trainer.callbacks:  # SIGTERM (SLURM's warning before a kill): last.ckpt at that step, and then
        if isinstance(cb, CheckpointOnSigterm):
            cb.resume = f"run the same sweep command again to resume {cell.name}"
    return cli


LENGTHGEN = "LengthGeneralizationCallback"


def floor_lengthgen(cli, min_length: int | None) -> int:
    """The study's eval_min_tokens as the min_length of the cell's LengthGeneralizationCallback(s), so the
    evaluations along training reach as far as the final one. Set on the built callbacks and on their entries in
    the parsed config (what the cell's config.yaml is written from), not as a command-line argument:
    ``--trainer.callbacks.init_args.min_length`` would go to the last callback of the list, whichever it is.
    Returns how many callbacks were set (0 when min_length is None: they keep the base config's)."""
    if min_length is None:
        return 0
    for entry in cli.config.get("trainer", {}).get("callbacks") or []:
        if str(entry.get("class_path", "")).rsplit(".", 1)[-1] == LENGTHGEN:
            entry.init_args.min_length = min_length
    built = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == LENGTHGEN]
    for cb in built:
        if cb.max_eval_tokens and cb.max_eval_tokens < min_length:
            raise SweepError(f"eval_min_tokens={min_length} is above the base config's LengthGeneralizationCallback "
                             f"max_eval_tokens={cb.max_eval_tokens}: lower one of them")
        cb.min_length = min_length
    return len(built)


def run_cell(study: Study, cell: Cell, log: Callable[[str], None] = print) -> dict | None:
    """Train, evaluate and record one cell; a cell with a result.json is skipped, a killed one resumed.

    Returns the result (None on ranks other than 0 of a multi-device cell), or ``{"cell", "stopped_at_step"}`` for a
    cell whose time budget (the Trainer's max_time) ran out first: it is left to be resumed, and the sweep goes on."""
    folder = cell_dir(study, cell)
    done = os.path.join(folder, "result.json")
    with claim_cell(study, cell) as lock:
        if os.path.exists(done):  # looked at once the cell is ours: another process may have just finished it
            log(f"sweep: {cell.name}: done already ({done}), skipped")
            with open(done) as f:
                return json.load(f)
        if lock is None:
            log(f"sweep: {cell.name}: another sweep is training it in this folder (it holds {cell_lock_path(study, cell)}"
                f"), skipped; the summary written last includes it")
            return None
        return train_cell(study, cell, log)


def cell_lock_path(study: Study, cell: Cell) -> str:
    return os.path.join(study.out, "cells", f".{cell.name}.lock")


@contextlib.contextmanager
def claim_cell(study: Study, cell: Cell):
    """The cell for this process alone while it trains and evaluates it: an exclusive ``flock`` on
    ``<out>/cells/.<cell>.lock``, yielding the lock's path, or None when another process holds it (two sweeps started
    on one folder then share its cells, as shards do, instead of training each cell twice into the same run
    directory). The kernel releases it when the process ends, by kill -9 too, so a lock file left behind blocks
    nothing. The other ranks of a multi-device cell (started by Lightning, re-running this command) follow rank 0
    and take no lock."""
    from lightning.pytorch.utilities import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) != 0:
        yield cell_lock_path(study, cell)
        return
    path = cell_lock_path(study, cell)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        try:
            yield path
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def train_cell(study: Study, cell: Cell, log: Callable[[str], None] = print) -> dict | None:
    """:func:`run_cell` once the cell is this process's and not done: train (resuming from last.ckpt), evaluate,
    write result.json."""
    folder = cell_dir(study, cell)
    done = os.path.join(folder, "result.json")
    cli = build_cli(study, cell)
    trainer, lit, dm = cli.trainer, cli.model, cli.datamodule
    last = os.path.join(folder, "checkpoints", "last.ckpt")
    resume = last if os.path.exists(last) else None
    devices = f" on each of {trainer.world_size} devices" if trainer.world_size > 1 else ""
    log(f"sweep: {cell.name}: training {study.steps} steps of {study.tokens_per_batch} tokens (batch "
        f"{dm.hparams.batch_size} x {cell.seq_len}{devices})" + (f", resuming from {resume}" if resume else ""))
    t0 = time.perf_counter()
    trainer.fit(lit, datamodule=dm, ckpt_path=resume)
    if trainer.global_step < study.steps:
        stopped = f"{cell.name}: training stopped at step {trainer.global_step:,} of {study.steps:,}"
        if not out_of_time(trainer):  # a max_epochs, or a callback stopped it: not a budget, so the sweep ends here
            raise SweepError(f"{stopped} (a max_epochs in the base config, or a callback that stops training?); "
                             f"re-run to resume it")
        log(f"sweep: {stopped}: its time budget (trainer max_time) is spent; the summary reads its last evaluation "
            f"along training as a provisional verdict, and re-running resumes it")
        return {"cell": cell.name, "stopped_at_step": trainer.global_step}
    train_seconds = time.perf_counter() - t0  # this process's fit only
    # every run's training of this cell (a resumed cell's train_seconds is its last run's): the throughput
    # monitor's clock, which checkpoints carry (validation left out); None without that callback
    all_runs = next((c.training_seconds() for c in trainer.callbacks if hasattr(c, "training_seconds")), None)
    result = None
    if trainer.is_global_zero:
        val = trainer.callback_metrics.get("val/loss")
        val = recorded_val_loss(folder, trainer.global_step) if val is None else float(val)
        result = evaluate_cell(study, cell, lit.model, dm, log)
        result.update(train_seconds=train_seconds, train_seconds_all_runs=all_runs, val_loss=val,
                      world_size=trainer.world_size, resumed_from=resume)
        write_json(done, result)
        log(f"sweep: {cell.name}: {verdict_word(result['verdict'], reason=True)} "
            f"(evaluated to {result['eval']['length']}), written {done}")
    trainer.strategy.barrier()  # the other ranks wait while rank 0 evaluates
    return result


def recorded_val_loss(folder: str, step: int) -> float | None:
    """The val/loss of the cell's newest validation at or before ``step``, from its ``val/step_<N>.json`` records.
    A cell resumed from a last.ckpt at its final step (killed, or failed, during its final evaluation) trains no
    further and Lightning does not validate again, so the loss is not in the trainer's metrics then."""
    from ..training.validation import RECORD_DIR

    records = {}
    for name in os.listdir(os.path.join(folder, RECORD_DIR)) if os.path.isdir(os.path.join(folder, RECORD_DIR)) else []:
        m = re.fullmatch(r"step_(\d+)\.json", name)
        if m and int(m[1]) <= step:
            records[int(m[1])] = os.path.join(folder, RECORD_DIR, name)
    if not records:
        return None
    try:
        with open(records[max(records)]) as f:
            value = json.load(f).get("val/loss")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def out_of_time(trainer) -> bool:
    """Whether the fit ended because the Trainer's ``max_time`` (its Timer callback) ran out: a cell's time budget,
    after which the sweep goes on to the next cell (last.ckpt is at that step: ``training.stops.CheckpointAtStop``).
    Decided on rank 0 and shared, as the Timer decides its stop."""
    from lightning.pytorch.callbacks import Timer

    remaining = [cb.time_remaining() for cb in trainer.callbacks if isinstance(cb, Timer)]
    return bool(trainer.strategy.broadcast(any(r is not None and r <= 0 for r in remaining)))


def evaluate_cell(study: Study, cell: Cell, model, dm, log: Callable[[str], None] = print) -> dict:
    """The final model on held-out text, fp32, no resets: loss vs position, the paper's verdict, ``ratio_far`` (the
    loss over the last quarter of the evaluated positions / mean[T/2,T], with its bootstrap interval: the same
    measurement as the evaluations along training, ``metrics.ratio_far`` and ``eval.far_window``), passkey."""
    from ..analysis.evaluator import eval_rows
    from ..analysis.forgetting import measure_forgetting

    t0 = time.perf_counter()
    T = cell.seq_len
    device = torch.device(study.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.eval().float().to(device)
    length = study.eval_length(T)
    rows, info = eval_rows(dm.val_tokens(), length + 1, study.eval_n_rows, dm.eos_id)
    if info["note"]:
        log(f"sweep: {cell.name}: note: {info['note']}")
    report = measure_forgetting(model, rows, T, study.bucket, study.threshold, piece_len=study.piece_len,
                                dtype=torch.float32, device=device, batch_size=study.eval_batch_size,
                                chunk_size="auto")  # speed only (analysis.evaluator.evaluation_chunk)
    cfg = model.config
    result = {
        "cell": cell.name, "row": cell.row, "axis": study.axis, "model_overrides": dict(cell.model),
        "d_state": cfg.mixer["d_state"], "n_layer": cfg.n_layer, "d_model": cfg.d_model,
        "headdim": cfg.mixer["headdim"],
        "seq_len": T, "n_s": cfg.state_size(), "n_s_ssm_only": cfg.state_size(ssm_only=True),
        "params": sum(p.numel() for p in model.parameters()),
        "steps": study.steps, "tokens_per_batch": study.tokens_per_batch,
        "tokens": study.steps * study.tokens_per_batch,
        "batch_size": study.tokens_per_batch // T, "seed": training_seed(study, cell),
        "eval": {"length": length, "bucket": report.bucket, "threshold": study.threshold, "dtype": "float32",
                 "rows": info, "far_window": list(report.far_window)},
        "verdict": report.verdict.to_dict(),
        "metrics": {**report.metrics(), **report.far_metrics()},
        "curve": {"positions": report.positions.tolist(), "loss": report.curve.tolist()},
    }
    if study.passkey:
        result["passkey"] = passkey_cell(study, cell, model, dm, device, log)
    result["eval_seconds"] = time.perf_counter() - t0
    return result


def passkey_cell(study: Study, cell: Cell, model, dm, device, log) -> dict | None:
    """Passkey grid at passkey_multiples x LEN (lengths shorter than the template are left out); None when every
    length is shorter than the template."""
    from ..analysis.passkey import evaluate_passkey
    from ..data.passkey import PasskeyGenerator, default_depths, load_template

    gen = PasskeyGenerator(dm.tokenizer, load_template(study.passkey_template))
    lengths = sorted({int(m * cell.seq_len) for m in study.passkey_multiples if m * cell.seq_len >= gen.min_length})
    if not lengths:
        log(f"sweep: {cell.name}: passkey skipped: every length is shorter than the template ({gen.min_length} tokens)")
        return None
    # study.seed, not the cell's: every replicate is asked the same keys
    grid = evaluate_passkey(model, gen, lengths, default_depths(study.passkey_depths), study.passkey_samples,
                            study.seed, study.piece_len, torch.float32, device, study.eval_batch_size)
    return grid.to_dict()


# Settings every cell of one study folder shares: what it trained on and how it was judged. A merged folder
# (study.merge) and a sweep run again on an existing --out (record_plan) must agree with the study on them.
MUST_AGREE = ("base_config", "model_overrides", "data_overrides", "models", "tokens_per_batch", "eval_multiple",
              "eval_tokens", "eval_min_tokens", "eval_n_rows", "bucket", "threshold", "precision", "seed",
              "piece_len", "passkey", "passkey_template")
PLAN_LISTS = ("states", "lens", "seeds")  # the grid's axes in study.json, joined like its cells
PLAN_NAMES = ("cells", "merged_from")  # lists kept in order, those of the plan already there first


def record_plan(study: Study, cells: list[Cell]) -> None:
    """<out>/study.json: this study's settings and the cells planned in the folder by every invocation so far. Slices
    of one grid run as separate invocations (``--states '[512]' --lens '[64]'`` beside ``--states '[256]' ...``, at
    once or one after another) add their cells to those already there, so that ``--summarize_only`` sees the
    union, not the last invocation's slice (:func:`update_plan`)."""
    update_plan(study.out, {**asdict(study), "cells": [c.name for c in cells]}, must_agree=MUST_AGREE)


def _comparable(key: str, value: Any) -> str:
    """A setting as compared between a folder's plan and a new invocation: JSON (tuples and lists alike); the
    speed-only model settings, which a resumed cell may change (docs/study.md, Resume), left out."""
    if key == "model_overrides" and isinstance(value, dict):
        from ..models.config import SPEED_ONLY_SETTINGS

        value = {k: v for k, v in value.items() if k not in SPEED_ONLY_SETTINGS}
    return json.dumps(value, sort_keys=True)


def update_plan(out: str, plan: dict, must_agree: tuple[str, ...] = ()) -> None:
    """Writes ``plan`` as <out>/study.json joined with the plan already there: its cells (and the folders merged in)
    first, then the new ones, and each axis of the grid the union of both. A lock file serialises invocations
    starting together. A setting of ``must_agree`` that differs from the plan already there is refused: the folder's
    cells were trained and judged with that one, and a done cell is not run again."""
    path = os.path.join(out, "study.json")
    plan = dict(plan)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path) as f:
                earlier = json.load(f)
        except (OSError, ValueError):
            earlier = {}
        if isinstance(earlier, dict):
            for key in must_agree:
                if key in earlier and key in plan and _comparable(key, earlier[key]) != _comparable(key, plan[key]):
                    raise SweepError(f"{out} holds a study with {key} {earlier[key]!r} (its study.json), not "
                                     f"{plan[key]!r}: its cells were trained and judged with that; give the same "
                                     f"setting, or a new --out for this one")
            for key in PLAN_NAMES:
                if earlier.get(key) or plan.get(key):
                    plan[key] = list(dict.fromkeys([*(earlier.get(key) or []), *(plan.get(key) or [])]))
            for key in PLAN_LISTS:
                if isinstance(earlier.get(key), list) and isinstance(plan.get(key), list):
                    plan[key] = sorted(set(earlier[key]) | set(plan[key]))
        write_json(path, plan)


def run_study(study: Study, log: Callable[[str], None] = print) -> list[dict]:
    """Every cell of this shard, in order; records the plan in <out>/study.json first (:func:`record_plan`)."""
    study.validate()
    check_device(study.device)  # here, not in validate: --summarize_only and --merge may run where it is missing
    check_out(study.out)
    missing = [path for path in study.base_config if not os.path.isfile(path)]  # (jsonargparse named it "config")
    if missing:
        raise SweepError(f"base_config {missing[0]!r} is not a file: give the run config(s) every cell starts from, "
                         f"e.g. [configs/train.yaml] (a relative path is read from the folder the command runs in)")
    cells = make_cells(study)
    mine = shard_cells(cells, study.shard)
    check_rows(study, mine)
    os.makedirs(os.path.join(study.out, "cells"), exist_ok=True)
    record_plan(study, cells)
    log(f"sweep: {len(cells)} cells in the grid, {len(mine)} in shard {study.shard}; study directory {study.out}")
    results, stopped = [], []
    for cell in mine:
        r = run_cell(study, cell, log)
        if r is not None and "stopped_at_step" in r:
            stopped.append(r["cell"])
        elif r is not None:
            results.append(r)
    if stopped:
        log(f"sweep: {len(stopped)} cell(s) stopped by their time budget before the planned {study.steps:,} steps "
            f"({', '.join(stopped)}): run the same command again to resume them")
    sys.stdout.flush()
    return results
