"""The decay of every head along training: A, dt and how much of the state survives T_train tokens.

Each Mamba-2 head multiplies its state by alpha_t = exp(dt_t * A) per token, with A = -exp(A_log) < 0 and
dt_t = softplus(dt_raw_t + dt_bias) > 0. Over the training length T the state keeps exp(sum_t dt_t * A)
= exp(mean dt * A * T) of what it held: a head whose alpha_T stays near 1 has not learned to forget within the
window it is trained on, the failure Stuffed Mamba (arXiv 2410.07145) describes. ``model.a_lr_mult`` speeds up
exactly these parameters; this callback shows what they do, cheaply enough to run every few steps.
"""

from __future__ import annotations

import math
import os

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from ..analysis.decays import over_heads
from ..analysis.evaluator import eval_rows
from ..atomic import atomic_write_json
from ..training.run_checks import SettingError
from ..training.sharding import fsdp_root
from ..training.validation import exists_on_rank_zero


def mixers(model) -> list:
    """The model's SSM mixers in layer order (every module with A_log and dt_bias)."""
    return [m for m in model.modules() if hasattr(m, "A_log") and hasattr(m, "dt_bias")]


def bias_dt(mixer) -> torch.Tensor:
    """softplus(dt_bias), clamped to the mixer's dt_limit: the step size of a zero dt_raw input, per head."""
    dt = torch.nn.functional.softplus(mixer.dt_bias.detach().double())
    low, high = getattr(mixer, "dt_limit", (0.0, math.inf))
    return dt.clamp(low, high) if (low, high) != (0.0, math.inf) else dt


@torch.no_grad()
def data_dt(model, rows: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the mean step size (h,) each head uses on ``rows`` (b, T) (one forward pass, no gradients)."""
    record: list[dict] = []
    device = next(model.parameters()).device
    model.hidden_states(rows.to(device), record=record)
    return [r["dt"].double().mean(dim=(0, 1)).cpu() for r in record]


def decay_dynamics(model, T: int, rows: torch.Tensor | None = None) -> dict:
    """Per layer and head: A, softplus(dt_bias), alpha_T from it, and with ``rows`` the mean dt on them and its
    alpha_T (all float lists, layer-major)."""
    ms = mixers(model)
    A = [-torch.exp(m.A_log.detach().double()).cpu() for m in ms]
    dt_b = [bias_dt(m).cpu() for m in ms]
    out = {"T": T, "A": [a.tolist() for a in A], "dt_bias_softplus": [d.tolist() for d in dt_b],
           "alpha_T_bias": [torch.exp(d * a * T).tolist() for d, a in zip(dt_b, A)]}
    if rows is not None:
        was_training = model.training
        model.eval()
        try:
            dt_d = data_dt(model, rows)
        finally:
            model.train(was_training)
        out["dt_mean"] = [d.tolist() for d in dt_d]
        out["alpha_T"] = [torch.exp(d * a * T).tolist() for d, a in zip(dt_d, A)]
        out["probe_tokens"] = int(rows.numel())
    return out


def summarize(dyn: dict, threshold: float) -> dict[str, float]:
    """Scalars for the loggers, over all heads of all layers."""
    A, dt_b, alpha_b = (over_heads(dyn, key) for key in ("A", "dt_bias_softplus", "alpha_T_bias"))
    out = {"dynamics/A_median": float(np.median(A)), "dynamics/A_min": float(A.min()),
           "dynamics/A_max": float(A.max()), "dynamics/dt_bias_median": float(np.median(dt_b)),
           "dynamics/alpha_T_bias_median": float(np.median(alpha_b)),
           f"dynamics/heads_alpha_T_bias_gt_{threshold}": float((alpha_b > threshold).sum()),
           "dynamics/heads": float(A.size)}
    if "alpha_T" in dyn:
        alpha, dt = over_heads(dyn, "alpha_T"), over_heads(dyn, "dt_mean")
        out.update({"dynamics/dt_mean_median": float(np.median(dt)), "dynamics/alpha_T_median": float(np.median(alpha)),
                    f"dynamics/heads_alpha_T_gt_{threshold}": float((alpha > threshold).sum())})
    return out


class DecayDynamicsCallback(L.Callback):
    """Every ``every_n_steps`` optimizer steps (at the start of training and at the end of fit too), per layer and
    head: A = -exp(A_log), softplus(dt_bias), and the state's survival over T = data.seq_len tokens
    alpha_T = exp(dt * A * T), with dt either softplus(dt_bias) (``_bias``, free) or the mean step size the model
    uses on ``probe_rows`` held-out rows of T tokens (one forward pass without gradients; 0 skips it).

    Logs ``dynamics/A_median``, ``A_min``, ``A_max``, ``dt_bias_median``, ``alpha_T_bias_median``,
    ``heads_alpha_T_bias_gt_{threshold}`` (a count), ``heads``; with the probe ``dt_mean_median``,
    ``alpha_T_median``, ``heads_alpha_T_gt_{threshold}``; histograms (TensorBoard) ``dynamics/log10_neg_A``,
    ``dynamics/log10_dt`` and ``dynamics/alpha_T``; and every layer's per-head values to
    ``<log_dir>/dynamics/step_<n>.json``. A run resumed at a step whose file is there does not measure it again
    (one point per step in TensorBoard). Runs on rank 0 (under FSDP every rank gathers A_log and dt_bias, and
    the probe is skipped).

    Args:
        every_n_steps: Optimizer steps between two measurements.
        threshold: A head with alpha_T above this has not learned to forget within T (the count logged).
        probe_rows: Held-out rows of T tokens for the measured dt (0: softplus(dt_bias) only).
        histograms: Also log TensorBoard histograms.
    """

    name = "dynamics"

    def __init__(self, every_n_steps: int = 50, threshold: float = 0.99, probe_rows: int = 1, histograms: bool = True):
        if every_n_steps < 1:
            raise SettingError(f"{type(self).__name__}: every_n_steps must be >= 1 (got {every_n_steps})")
        if not 0 < threshold < 1:
            raise SettingError(f"{type(self).__name__}: threshold must be in (0, 1) (got {threshold})")
        if probe_rows < 0:
            raise SettingError(f"{type(self).__name__}: probe_rows must be >= 0 (got {probe_rows})")
        self.every_n_steps, self.threshold, self.probe_rows, self.histograms = every_n_steps, threshold, probe_rows, histograms
        self._last_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step % self.every_n_steps == 0 and not self._recorded(trainer):
            self._run(trainer, pl_module)

    def _recorded(self, trainer: L.Trainer) -> bool:
        """Resumed at a step whose measurement this run directory already holds (the interrupted run made it from
        the same weights): measuring again would log a second point at that step."""
        if trainer.ckpt_path is None or trainer.global_step == 0:
            return False
        return exists_on_rank_zero(trainer, self.result_path(trainer, trainer.global_step))

    def result_path(self, trainer: L.Trainer, step: int) -> str:
        log_dir = trainer.loggers[0].log_dir if trainer.loggers else None  # the logger's: no broadcast
        return os.path.join(log_dir or trainer.default_root_dir, self.name, f"step_{step}.json")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._run(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run(trainer, pl_module)

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:  # gradient accumulation: several batches per step
            return
        self._last_step = step
        data = getattr(trainer, "datamodule", None)
        T = int(data.hparams.seq_len) if data is not None and hasattr(data, "hparams") else None
        if T is None:
            return
        root = fsdp_root(trainer)
        if root is not None:  # sharded: gather (collective: every rank enters), rank 0 reads
            from torch.distributed.fsdp import FullyShardedDataParallel

            with FullyShardedDataParallel.summon_full_params(root, writeback=False, rank0_only=True):
                if trainer.is_global_zero:
                    self._measure(trainer, pl_module.model, T, step, None)
            return
        if trainer.is_global_zero:
            rows = None
            if self.probe_rows and hasattr(data, "val_tokens"):
                rows, _ = eval_rows(data.val_tokens(), T, self.probe_rows, getattr(data, "eos_id", None))
            self._measure(trainer, pl_module.model, T, step, rows)

    def _measure(self, trainer: L.Trainer, model, T: int, step: int, rows) -> None:
        dyn = decay_dynamics(model, T, rows)
        metrics = summarize(dyn, self.threshold)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if self.histograms and isinstance(logger, TensorBoardLogger):
                flat = lambda key: np.concatenate([np.asarray(v) for v in dyn[key]])  # noqa: E731
                logger.experiment.add_histogram("dynamics/log10_neg_A", np.log10(-flat("A")), step)
                logger.experiment.add_histogram("dynamics/log10_dt", np.log10(flat("dt_mean" if "dt_mean" in dyn
                                                                                   else "dt_bias_softplus")), step)
                logger.experiment.add_histogram("dynamics/alpha_T", flat("alpha_T" if "alpha_T" in dyn
                                                                         else "alpha_T_bias"), step)
        atomic_write_json(self.result_path(trainer, step),
                          {"step": step, "threshold": self.threshold, "summary": metrics, **dyn})
