"""Loss far past the training length, during training: the paper's forgetting test as a callback."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from ..analysis import plots
from ..analysis.criterion import bucket_problem, threshold_problem, verdict_text, verdict_word
from ..analysis.evaluator import chunk_size_problem, eval_rows, resolve_dtype, write_position_losses_csv
from ..analysis.forgetting import (
    DEFAULT_EVAL_ROWS,
    DEFAULT_MAX_MULTIPLE,
    measure_forgetting,
    multiples_up_to,
)
from ..atomic import atomic_write_json
from ..models.config import ConfigError
from ..training.run_checks import SettingError
from ..training.sharding import fsdp_root, unsharded_copy
from ..training.validation import exists_on_rank_zero, validation_due
from .figure_process import FigureQueue

# Significant digits of the floats in the step JSONs of the periodic analyses (curves computed in float32: ~7 are
# real; six keep the files of a 40-evaluation study cell at ~1/2 the size)
JSON_DIGITS = 6


class PeriodicAnalysis(L.Callback):
    """Runs ``analyze`` on rank 0 after every ``every_n_validations``-th validation (not the sanity check)
    and once at the end of fit (unless the last validation already covered that step), with the model in
    eval mode; reads T_train and held-out tokens from ``trainer.datamodule`` and logs to every logger.
    Under FSDP every rank gathers the parameters and rank 0 analyses an unsharded copy of the model.

    The count of validations is kept in checkpoints. A run resumed from a checkpoint written just before a
    validation (``ModelCheckpoint(every_n_train_steps)`` saves before the validation of the same step runs) does
    not get that validation again from Lightning: if the interrupted run did not finish it, that is, if
    ``<log_dir>/<name>/step_<step>.json`` is missing, the analysis it was due for runs at the start of training.

    Figures are drawn at the first run, then every ``figures_every_n_runs``-th, and at the end of fit; scalars and
    JSON every run. Drawing is host time (~0.1-0.3 s a figure on a CPU core), so a figure given as a picklable recipe
    (``functools.partial`` of a plotting function) is drawn in a process of its own (figure_process.py) and written
    into TensorBoard at its step when done: finished ones after each training batch, the rest before the loggers
    close."""

    name = "analysis"

    def __init__(self, every_n_validations: int = 1, figures_every_n_runs: int = 1):
        if every_n_validations < 1:
            raise SettingError(f"{type(self).__name__}: every_n_validations must be >= 1 (got {every_n_validations})")
        if type(figures_every_n_runs) is not int or figures_every_n_runs < 1:
            raise SettingError(f"{type(self).__name__}: figures_every_n_runs must be an integer >= 1 "
                               f"(got {figures_every_n_runs!r})")
        self.every_n_validations = every_n_validations
        self.figures_every_n_runs = figures_every_n_runs
        self._runs = 0  # analyses run so far (kept in checkpoints: the figures' cadence survives a resume)
        self._figures_due = True
        self._published: dict[str, float] = {}  # this run's scalars, for trainer.callback_metrics
        self._validations = 0
        self._validated_step: int | None = None  # the step of the last validation counted
        self._last_step: int | None = None
        self._disabled = False
        self._figures = FigureQueue()

    def analyze(self, trainer: L.Trainer, model, data: Any, step: int) -> None:
        raise NotImplementedError

    # ---- cadence -------------------------------------------------------------------------
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._count_validation(trainer, pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # resumed at a validation step that the checkpoint does not count yet (killed during that validation, or
        # after it): Lightning skips that validation, so do this callback's part of it unless its result is there
        step = trainer.global_step
        if trainer.ckpt_path is None or step == 0 or self._validated_step == step or not validation_due(trainer):
            return
        self._count_validation(trainer, pl_module, unless_done=True)

    def _count_validation(self, trainer: L.Trainer, pl_module: L.LightningModule, unless_done: bool = False) -> None:
        self._validations += 1
        self._validated_step = trainer.global_step
        if self._validations % self.every_n_validations != 0:
            return
        if unless_done and self._done(trainer):
            # the interrupted run finished this analysis after its checkpoint was written: count it, so that the
            # figures keep the cadence of an uninterrupted run
            self._runs += 1
            self._last_step = trainer.global_step
            return
        self._run(trainer, pl_module)

    def _done(self, trainer: L.Trainer) -> bool:
        """Whether this run's directory holds the result for the current step (rank 0 looks; all ranks agree)."""
        return exists_on_rank_zero(trainer, self.result_path(trainer, trainer.global_step))

    def state_dict(self) -> dict:
        return {"validations": self._validations, "validated_step": self._validated_step, "runs": self._runs}

    def load_state_dict(self, state_dict: dict) -> None:
        self._validations = int(state_dict.get("validations", 0))
        self._validated_step = state_dict.get("validated_step")
        self._runs = int(state_dict.get("runs", 0))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_step != trainer.global_step:
            self._run(trainer, pl_module, final=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self._figures.collect()  # the figures drawn by now, at their steps

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.flush_figures()  # after on_fit_end's final figures, before the loggers close (validate runs too)

    def flush_figures(self) -> None:
        """Wait for the figures still being drawn and write them (``analyze`` called outside a Trainer needs it)."""
        self._figures.collect(wait=True)

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool = False) -> None:
        self._last_step = trainer.global_step
        if self._disabled:
            return
        self._figures_due = final or self._runs % self.figures_every_n_runs == 0 or last_step_of_fit(trainer)
        self._runs += 1
        self._published = {}
        self._analyze_on_rank_zero(trainer, pl_module)
        # Every rank gets rank 0's scalars in callback_metrics, so that ModelCheckpoint(monitor=...) and
        # EarlyStopping can use them (e.g. monitor="lengthgen/ratio_4_16x") and all ranks decide alike.
        published = trainer.strategy.broadcast(self._published, src=0) if trainer.world_size > 1 else self._published
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in published.items()})

    def _analyze_on_rank_zero(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        data = getattr(trainer, "datamodule", None)  # the same on every rank: all ranks agree on running
        missing = [a for a in ("hparams", "val_tokens", "tokenizer") if not hasattr(data, a)]
        if data is None or missing:
            rank_zero_warn(f"{type(self).__name__} is off: the data module must provide hparams.seq_len, "
                           f"val_tokens() and tokenizer (missing: {', '.join(missing) or 'the data module'})")
            self._disabled = True
            return
        root = fsdp_root(trainer)
        if root is None:
            if trainer.is_global_zero:
                self._analyze(trainer, pl_module.model, data)
            return
        # FSDP: the parameters are sharded. Gathering them is collective (every rank enters); rank 0 then
        # evaluates a plain copy, as FSDP's own forward would gather again, on rank 0 alone (a hang).
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(root, writeback=False, rank0_only=True):
            model = unsharded_copy(pl_module.model) if trainer.is_global_zero else None
        if model is not None:
            self._analyze(trainer, model, data)

    def _analyze(self, trainer: L.Trainer, model, data: Any) -> None:
        was_training = model.training
        model.eval()
        try:
            self.analyze(trainer, model, data, trainer.global_step)
        finally:
            model.train(was_training)

    # ---- shared settings ---------------------------------------------------------------------
    def eval_length(self, T: int) -> int:
        """How far to evaluate: max(multiples) x T_train, capped by ``max_eval_tokens`` (set by subclasses)."""
        length = int(max(self.multiples) * T)
        return min(length, int(self.max_eval_tokens)) if self.max_eval_tokens else length

    @staticmethod
    def default_piece_len(model) -> int:
        """Evaluation piece length: long pieces pay off on a GPU, 512 measured faster on CPU."""
        return 2048 if next(model.parameters()).is_cuda else 512

    # ---- output ----------------------------------------------------------------------------
    def log_scalars(self, trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        metrics = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
        self._published.update(metrics)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def log_figure(self, trainer: L.Trainer, tag: str, make_figure: Callable[[], Any], step: int) -> None:
        """Draws ``make_figure()`` into every TensorBoard logger, when this run's figures are due (else nothing is
        drawn: the figure is built only here), in the drawing process if ``make_figure`` pickles (class docstring)."""
        if not self._figures_due:
            return
        writers = [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if writers:
            self._figures.submit(make_figure, tag, step, writers)

    def out_dir(self, trainer: L.Trainer, create: bool = True) -> str:
        # Only rank 0 gets here: trainer.log_dir broadcasts across ranks (and would hang), the logger's does not.
        log_dir = trainer.loggers[0].log_dir if trainer.loggers else None
        path = os.path.join(log_dir or trainer.default_root_dir, self.name)
        if create:
            os.makedirs(path, exist_ok=True)
        return path

    def result_path(self, trainer: L.Trainer, step: int) -> str:
        """The file an analysis at ``step`` writes last (its presence says the analysis is complete)."""
        return os.path.join(self.out_dir(trainer, create=False), f"step_{step}.json")


def check_dtype(owner: str, dtype: str) -> None:
    """An analysis callback's ``dtype`` is one the evaluator knows: said when the callback is built, not at its first
    run after hundreds of training steps."""
    try:
        resolve_dtype(dtype)
    except ValueError as e:
        raise SettingError(f"{owner}: {e}") from None


def last_step_of_fit(trainer: L.Trainer) -> bool:
    """Whether training ends at this step (``max_steps`` reached, or the last batch of the last epoch): a validation
    there is the end of fit's analysis, and on_fit_end does not run it again."""
    if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    epochs = trainer.max_epochs
    return bool(epochs is not None and epochs > 0 and trainer.current_epoch + 1 >= epochs
                and getattr(trainer, "is_last_batch", False))


class LengthGeneralizationCallback(PeriodicAnalysis):
    """Loss vs position on held-out text out to ``max(multiples)`` x T_train (default 64), or ``min_length`` tokens
    when that is further, and the forgetting verdict on the whole evaluated range
    (:func:`..analysis.forgetting.forgetting_report`: the first and the last bucket not judged).

    Args:
        every_n_validations: Run after every N-th validation (and at the end of fit).
        multiples: Context lengths, in units of T_train, to log a loss for; the largest sets how far to evaluate.
            ``lengthgen/loss@{m}x`` is the mean loss over positions (mT/2, mT] (for 1x: (T/2, T], the second half
            of the training window). ``ratio_16_64x`` needs 64 in it.
        n_rows: Held-out rows (documents joined with EOS, no reset) of max(multiples) x T_train tokens; the paper
            averages many, and fewer than 32 make the ratio's interval wide.
        bucket: Positions per bucket of the curve the criterion sees (default T_train // 8, at least 16, at most
            T_train // 2).
        piece_len: Tokens per forward; the state is carried between pieces (default 2048 on GPU, 512 on CPU,
            where smaller pieces are faster).
        max_eval_tokens: Cap on the evaluated length (multiples beyond it are skipped).
        dtype: float32 (the paper's analysis precision), tf32 (float32 with its matmuls on TF32 tensor cores, as
            mamba_ssm's Triton scan already takes its dot products on a GPU) or bfloat16.
        chunk_size: The scan's chunk for the evaluated rows (default: the model's). Speed only: the losses agree to
            float rounding. Long rows of a large state run faster in larger chunks than a short training LEN's;
            ``auto`` picks by the state's size on a GPU (``analysis.evaluator.evaluation_chunk``: 256 from d_state
            512, else 128), the model's on a CPU.
        threshold: The criterion's factor: fails if a judged bucket exceeds threshold x the max within T_train.
        min_length: A floor, in tokens, on the evaluated length: evaluate to max(max(multiples) x T_train,
            min_length) (not past ``max_eval_tokens``). At a small T_train, 64 x T is short (2,048 tokens at 32),
            and a loss that rises slowly crosses the 2x line only further out; the verdict and ``ratio_far`` cover
            the whole evaluated range, loss@{m}x and the ratios keep their windows. null: no floor.
        figures_every_n_runs: Draw the figure at the first run, every N-th, and at the end of fit (scalars and
            JSON every run).

    Logs ``lengthgen/loss@{m}x``, ``lengthgen/forgets`` (1/0), ``lengthgen/blowup_position`` (-1 if none; neither
    of the two for an undetermined verdict, a non-finite loss: see ``step_<step>.json``'s ``verdict.undetermined``),
    ``lengthgen/ratio_4_16x`` (mean[4T,16T] / mean[T/2,T], when evaluated to 16T), ``lengthgen/ratio_16_64x``
    (mean[16T,64T] / mean[T/2,T], when evaluated to 64T) with its bootstrap 95% interval over rows
    ``lengthgen/ratio_16_64x_lo`` and ``_hi``, ``lengthgen/ratio_far`` (the mean over the last quarter of the
    evaluated positions / mean[T/2,T], see :func:`..analysis.forgetting.far_ratio`) with ``_lo`` and ``_hi``, the figure
    ``lengthgen/loss_vs_position``, and ``<log_dir>/lengthgen/step_<step>.json`` (verdict with the ratios, rows and
    evaluated_to, ``far_window`` [lo, hi]: ratio_far's positions (lo, hi], bucket curve, ``seconds`` it took,
    ``written_at_ms`` the wall clock) and ``.csv`` (position, loss
    averaged over rows: the per-position curve, written once; ``analysis.evaluator.read_position_losses_csv``).
    """

    name = "lengthgen"

    def __init__(
        self,
        every_n_validations: int = 1,
        multiples: tuple[int, ...] | list[int] = multiples_up_to(DEFAULT_MAX_MULTIPLE),
        n_rows: int = DEFAULT_EVAL_ROWS,
        bucket: int | None = None,
        piece_len: int | None = None,
        max_eval_tokens: int | None = None,
        dtype: str = "float32",
        threshold: float = 2.0,
        min_length: int | None = None,
        figures_every_n_runs: int = 1,
        chunk_size: int | Literal["auto"] | None = None,
    ):
        super().__init__(every_n_validations, figures_every_n_runs)
        check_dtype(type(self).__name__, dtype)
        if problem := chunk_size_problem(chunk_size):
            raise SettingError(f"{type(self).__name__}: {problem}")
        if not multiples or min(multiples) < 1:
            raise SettingError(f"{type(self).__name__}: multiples must be positive integers (got {multiples})")
        if problem := threshold_problem(threshold):
            raise SettingError(f"{type(self).__name__}: threshold {problem}")
        if min_length is not None and (type(min_length) is not int or min_length < 1):
            raise SettingError(f"{type(self).__name__}: min_length must be a positive number of tokens, or null "
                               f"(got {min_length!r})")
        if min_length and max_eval_tokens and min_length > max_eval_tokens:
            raise SettingError(f"{type(self).__name__}: min_length={min_length} is above max_eval_tokens="
                               f"{max_eval_tokens}: lower one of them")
        self.multiples = tuple(sorted(int(m) for m in multiples))
        self.n_rows, self.bucket, self.piece_len = n_rows, bucket, piece_len
        self.max_eval_tokens, self.dtype, self.threshold = max_eval_tokens, dtype, threshold
        self.min_length, self.chunk_size = min_length, chunk_size
        self.last_result: dict | None = None  # {"step", "verdict"} of this run's latest evaluation (the fit summary)
        self._noted = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # a bucket the criterion cannot use would stop the run at its first evaluation, after training to it
        T = getattr(getattr(trainer.datamodule, "hparams", None), "seq_len", None)
        if self.bucket is not None and T and (problem := bucket_problem(self.bucket, int(T))):
            raise ConfigError(f"LengthGeneralizationCallback's bucket {problem} (data.seq_len)")

    def eval_length(self, T: int) -> int:
        """max(multiples) x T_train, at least ``min_length``, at most ``max_eval_tokens``."""
        length = max(int(max(self.multiples) * T), self.min_length or 0)
        return min(length, int(self.max_eval_tokens)) if self.max_eval_tokens else length

    def analyze(self, trainer: L.Trainer, model, data: Any, step: int) -> None:
        t0 = time.perf_counter()
        T = int(data.hparams.seq_len)
        length = self.eval_length(T)
        rows, info = eval_rows(data.val_tokens(), length + 1, self.n_rows, getattr(data.tokenizer, "eos_id", None))
        if info["note"]:
            rank_zero_warn(f"lengthgen: {info['note']}")
        report = measure_forgetting(model, rows, T, self.bucket, self.threshold, self.multiples,
                                    piece_len=self.piece_len or self.default_piece_len(model), dtype=self.dtype,
                                    chunk_size=self.chunk_size)
        verdict = report.verdict
        metrics = {**report.scalars("lengthgen/"), **report.far_metrics("lengthgen/")}
        far = report.far_window
        self.log_scalars(trainer, metrics, step)
        self._note_scalars(trainer, T, far)
        self.last_result = {"step": step, "verdict": verdict.to_dict()}

        title = verdict_word(verdict.to_dict(), reason="short")
        if verdict.forgets is False:
            title += f", blow-up at {verdict.blowup_position}"
        self.log_figure(trainer, "lengthgen/loss_vs_position",
                        partial(plots.plot_forgetting_report, report, self.threshold, f"step {step}: {title}"), step)

        out = os.path.join(self.out_dir(trainer), f"step_{step}")
        write_position_losses_csv(out + ".csv", report.per_position)
        atomic_write_json(out + ".json", {  # last: its presence says this step's analysis is complete
            "step": step, "seq_len": T, "bucket": report.bucket, "rows": info, "dtype": self.dtype,
            "verdict": verdict.to_dict(), "metrics": metrics, "far_window": list(far),
            "bucket_positions": report.positions.tolist(), "bucket_loss": report.curve.tolist(),
            # the per-position curve is the CSV's alone: twice it was most of a study's disk (~0.8 MB an evaluation)
            "per_position_csv": os.path.basename(out) + ".csv", "seconds": time.perf_counter() - t0,
            # unix time in ms (an int: float_digits rounds floats): how fast the run went, for
            # benchmarks/sweep_speed.py, in copies of the folder too
            "written_at_ms": int(time.time() * 1000)},
            float_digits=JSON_DIGITS)

    def summary_line(self) -> str:
        """The fit summary's line (training/cli.py asks every callback that has this method)."""
        if self.last_result is None:
            return "forgetting:      not evaluated"
        return f"forgetting:      {verdict_text(self.last_result['verdict'])} at step {self.last_result['step']}"

    def _note_scalars(self, trainer: L.Trainer, T: int, far: tuple[int, int]) -> None:
        """Said once in TensorBoard, beside the scalars: -1 as ``lengthgen/blowup_position`` means none (TensorBoard
        keeps it a number), and the positions ``lengthgen/ratio_far`` averages."""
        if self._noted:
            return
        self._noted = True
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("lengthgen/blowup_position", "-1 means none: no bucket of the loss curve "
                                           "exceeds the threshold (the model forgets)", global_step=0)
                logger.experiment.add_text("lengthgen/ratio_far", f"mean loss over positions ({far[0]}, {far[1]}] "
                                           f"(the last quarter evaluated) / mean over ({T // 2}, {T}]", global_step=0)
