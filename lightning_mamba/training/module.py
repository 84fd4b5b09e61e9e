"""The LightningModule: next-token loss, AdamW groups, warm-up + WSD/cosine schedule, metrics."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer import call
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric, MinMetric

from ..models import ConfigError, MambaConfig, MambaLM
from ..models.config import SPEED_ONLY_SETTINGS, SSM_DEFAULTS, TRAIN_DEFAULTS
from ..models.flops import train_flops_per_token
from ..models.kernels.backend import check_backend
from . import tensorboard_resume, validation
from .checkpoint_io import check_intact, check_model_shape, check_tokenizer, flat_settings, model_config
from .cuda_graph import GraphedLoss, GraphedUpdate
from .initial_states import NEEDS_LANES, InitialStates
from .schedule import SCHEDULES, lr_factor
from .sharding import fsdp_root, unwrapped_name

DECAY_RATE_PARAMS = ("A_log", "dt_bias")  # the decay exp(dt * A) of every head: model.a_lr_mult scales their lr


class MambaLitModule(L.LightningModule):
    """A Mamba-2 language model trained with next-token cross-entropy.

    Args:
        d_model: Width of the residual stream.
        n_layer: Number of Mamba-2 blocks.
        d_state: SSM state size N per head (the study's STATE). The default is this project's training one; a
            config.json that leaves d_state out means the official Mamba2 default (models/config.py holds both).
        headdim: Head dimension P; must divide expand * d_model.
        expand: d_inner = expand * d_model.
        d_conv: Width of the causal depthwise convolution.
        ngroups: Number of B/C groups shared by the heads.
        chunk_size: Chunk length of the SSD scan (speed only; results do not depend on it).
        quadratic_max_len: Inputs of at most this many tokens from a zero state (training, validation) skip the
            chunked scan for its attention form, which pads nothing to a chunk and builds no state (speed and memory
            only: the same results; O(len^2) memory, so for short training lengths, e.g. 64). 0: always chunked.
        save_chunk_states: On the GPU's chunked scan (mamba_ssm's kernels), keep the forward's per-chunk states for
            the backward instead of recomputing them: less time, more memory (batch x seq_len / chunk_size x
            heads x headdim x d_state values a layer). Speed and memory only.
        recompute_norm_output: On the Triton path, keep no copy of each mixer's input (in_proj's, the residual add +
            RMSNorm's output) for the backward, which makes it again from the fp32 residual the norm keeps: less
            memory (2 bytes per token and d_model a layer), one norm pass a layer more. Speed and memory only.
        dt_min: Initial step sizes dt are log-uniform in [dt_min, dt_max] (official init). Small values start
            every head with a slow decay, a model that remembers far and must learn to forget.
        dt_max: See dt_min.
        A_init_range: Initial A = -uniform(A_init_range) per head (official: 1 to 16).
        dt_limit: dt is clamped to [low, high] in every forward (official; default no limit). A small high
            keeps every head's decay slow for good: a model that cannot learn to forget (an ablation).
        vocab_size: Tokenizer vocabulary; the CLI links it from the data module.
        pad_vocab_size_multiple: The embedding is padded to a multiple of this (official: 8, checkpoints 16).
        tie_embeddings: Share the embedding and the LM head weights.
        backend: SSD kernels: 'auto' (Triton on CUDA when mamba-ssm imports, else torch), 'torch' or 'triton'.
        pretrained: Weights to start from (fine-tuning): a directory with an official-layout config.json +
            pytorch_model.bin, or a training checkpoint (.ckpt) of this project (its weights only: not its optimizer,
            schedule or data position; to resume a run use --ckpt_path). Its config replaces the shape arguments
            above (hyper_parameters record its; the CLI refuses a typed one that differs and writes its into the
            run's config.yaml), except chunk_size, quadratic_max_len, save_chunk_states and recompute_norm_output,
            the speed-only settings, which are this run's (the CLI gives the checkpoint's unless they are typed); the
            data's tokenizer must be the one it was trained with, and the CLI's data.seq_len defaults to the length it
            was trained at.
        lr: Peak learning rate.
        weight_decay: AdamW weight decay (not applied to A_log, dt_bias, D, norms and biases).
        betas: AdamW betas.
        schedule: 'wsd' (warm-up, stable, linear decay at the end), 'cosine' or 'constant'.
        warmup_steps: Linear warm-up steps.
        decay_fraction: Share of the steps in the final decay of the WSD schedule.
        min_lr_ratio: Final learning rate as a fraction of the peak.
        a_lr_mult: The learning rate of A_log and dt_bias (the decay's parameters) is lr x this, in a parameter group
            of their own (no weight decay, same schedule). A DEVIATION from the paper's training when != 1: a larger
            value lets the decays move faster, which brings the failure to forget (or its cure) forward.
        initial_state: What each training sample's state starts from (Buitrago Ruiz & Gu, 2025): 'zero' (as in
            Stuffed Mamba), 'passed' (the previous batch's final state of the same row, detached: truncated BPTT;
            needs data.state_passing; kept in checkpoints) or 'noise' (Gaussian SSM states, zero conv states).
            Validation and testing always start from zero.
        noise_scale: 'noise': standard deviation per (layer, head), in units of the RMS of the model's own final
            SSM states on training samples started from zero.
        noise_calibrate_every: 'noise': measure that RMS at the first step and every this many steps (a forward
            pass without gradients on the step's batch).
        replan_schedule: On a resume (--ckpt_path) plan the lr schedule over the new run's length (e.g. a larger
            --trainer.max_steps). Off: the schedule keeps the length the run started with (it is in the
            checkpoint), so the lr does not jump back up; past its end it stays at its final value.
        cuda_graph: Capture the training loss's forward and backward as one CUDA graph at the first training step
            and replay it at every later one (training/cuda_graph.py): removes the CPU cost of launching the
            step's kernels and of autograd, which bounds the step time of small and mid-size models on a GPU. One
            CUDA device, zero initial states, bf16-mixed or 32-true, no gradient accumulation; a batch of another
            shape runs eagerly.
        cuda_graph_update: With cuda_graph, also replay what follows the backward as a CUDA graph: the NaN guard's
            finiteness check, norm clipping (trainer.gradient_clip_algorithm norm) and the fused AdamW update
            (training/cuda_graph.py GraphedUpdate), captured after the first step. On the study's small cells the
            eager update costs the host more time per step than the GPU needs for the whole step. The
            on_before_optimizer_step hooks then run after the update was enqueued (they see clipped gradients).
    """

    def __init__(
        self,
        # model defaults: models/config.py (the official ones, and where the trained model departs from them)
        d_model: int = TRAIN_DEFAULTS.d_model,
        n_layer: int = TRAIN_DEFAULTS.n_layer,
        d_state: int = TRAIN_DEFAULTS.d_state,
        headdim: int = SSM_DEFAULTS.headdim,
        expand: int = SSM_DEFAULTS.expand,
        d_conv: int = SSM_DEFAULTS.d_conv,
        ngroups: int = SSM_DEFAULTS.ngroups,
        chunk_size: int = SSM_DEFAULTS.chunk_size,
        quadratic_max_len: int = SSM_DEFAULTS.quadratic_max_len,
        save_chunk_states: bool = SSM_DEFAULTS.save_chunk_states,
        recompute_norm_output: bool = SSM_DEFAULTS.recompute_norm_output,
        dt_min: float = SSM_DEFAULTS.dt_min,
        dt_max: float = SSM_DEFAULTS.dt_max,
        A_init_range: tuple[float, float] = SSM_DEFAULTS.A_init_range,
        dt_limit: tuple[float, float] = SSM_DEFAULTS.dt_limit,
        vocab_size: int = TRAIN_DEFAULTS.vocab_size,
        pad_vocab_size_multiple: int = MambaConfig.pad_vocab_size_multiple,
        tie_embeddings: bool = MambaConfig.tie_embeddings,
        backend: str = "auto",
        pretrained: str | None = None,
        lr: float = 2e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        schedule: str = "wsd",
        warmup_steps: int = 100,
        decay_fraction: float = 0.1,
        min_lr_ratio: float = 0.0,
        a_lr_mult: float = 1.0,
        initial_state: str = "zero",
        noise_scale: float = 1.0,
        noise_calibrate_every: int = 50,
        cuda_graph: bool = False,
        replan_schedule: bool = False,
        cuda_graph_update: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        check_backend(backend)
        if schedule not in SCHEDULES:
            raise ConfigError(f"model.schedule={schedule!r} is unknown: use one of {', '.join(SCHEDULES)}")
        if lr <= 0:
            raise ConfigError(f"model.lr must be > 0 (got {lr})")
        if not a_lr_mult > 0:  # NaN too
            raise ConfigError(f"model.a_lr_mult must be > 0 (got {a_lr_mult}): 1 trains A_log and dt_bias at model.lr")
        check_optimizer_settings(weight_decay, betas, warmup_steps, decay_fraction, min_lr_ratio)
        self.initial_states = InitialStates(initial_state, noise_scale, noise_calibrate_every)
        self._pretrained_meta: dict | None = None
        if pretrained:
            from .checkpoint_io import load_model

            self.model, self._pretrained_meta = load_model(pretrained, backend=backend)
            # the scan's speed-only settings are the run's (the CLI gives the checkpoint's unless they were typed)
            self.model.set_scan_settings(**{k: self.hparams[k] for k in SPEED_ONLY_SETTINGS})
            # the shape trained is the checkpoint's: hyper_parameters (and so a resume's checks) record it
            self.hparams.update(flat_settings(self.model.config), vocab_size=self.model.config.vocab_size)
        else:
            self.model = MambaLM(model_config(**self.hparams), backend=backend)
        # Read off the model as built: under FSDP the parameters become flat 1-D shards, which tell neither
        # their shape nor their size (parameter_groups).
        self._no_decay_names = frozenset(n for n, p in self.model.named_parameters()
                                         if getattr(p, "_no_weight_decay", False) or p.ndim < 2)
        self._decay_rate_names = frozenset(n for n, _ in self.model.named_parameters()
                                           if n.rsplit(".", 1)[-1] in DECAY_RATE_PARAMS)
        self.val_loss = MeanMetric()
        self.val_loss_best = MinMetric()
        if cuda_graph and initial_state != "zero":
            raise ConfigError(f"model.cuda_graph needs model.initial_state zero (got {initial_state!r}): the graphs "
                              f"capture a step from zero states; drop one of the two")
        if cuda_graph_update and not cuda_graph:
            raise ConfigError("model.cuda_graph_update replays the update after the loss's graph: it needs "
                              "model.cuda_graph true (or drop it)")
        self._graphed_loss = GraphedLoss(self.model) if cuda_graph else None
        self._graphed_update: GraphedUpdate | None = None  # set up for fit (setup)
        self.graphed_update_verdict: tuple | None = None  # (global step, bad, norm) of a graphed update: NanGuard
        self._schedule_total: int | None = None  # the lr schedule's length in steps (kept in checkpoints)
        self._tokens_trained = 0  # training tokens of this run, all processes (kept in checkpoints)
        self._offered_grad_norm: tuple[int, torch.Tensor] | None = None  # (global step, norm): offer_grad_norm
        self._held_logs: dict[str, torch.Tensor] = {}  # this step's values not yet given to self.log: log_step

    @property
    def config(self) -> MambaConfig:
        return self.model.config

    def forward(self, input_ids: torch.Tensor, **kwargs: Any):
        return self.model(input_ids, **kwargs)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if self._pretrained_meta is not None:
            check_tokenizer({"lightning_mamba": self._pretrained_meta}, dm, self.hparams.pretrained)
        if stage == "fit" and self._graphed_loss is not None:
            self._check_cuda_graph()
            if self.hparams.get("cuda_graph_update"):
                self._graphed_update = GraphedUpdate(self._graphed_loss, self.trainer.gradient_clip_val)
        if stage != "fit" or dm is None:
            return
        lanes = getattr(dm.hparams, "state_passing", False)
        if self.initial_states.mode == "passed" and not lanes:
            raise ConfigError(NEEDS_LANES)
        if lanes and self.initial_states.mode != "passed":
            rank_zero_warn(f"data.state_passing is on but model.initial_state={self.initial_states.mode}: the batches "
                           f"continue each other, the states are not passed on (set model.initial_state passed)")

    def _check_cuda_graph(self) -> None:
        trainer = self.trainer
        if trainer.accumulate_grad_batches > 1:
            # a parameter's .grad is the graph's gradient buffer: the next replay would overwrite the gradient being
            # accumulated
            raise ConfigError(f"model.cuda_graph needs --trainer.accumulate_grad_batches 1 (got "
                              f"{trainer.accumulate_grad_batches}): raise data.batch_size instead, or drop it")
        if self.hparams.get("cuda_graph_update") and (trainer.gradient_clip_algorithm or "norm") != "norm":
            raise ConfigError(f"model.cuda_graph_update clips by norm in its graph (got --trainer.gradient_clip_algorithm "
                              f"{getattr(trainer.gradient_clip_algorithm, 'value', trainer.gradient_clip_algorithm)}): "
                              f"use norm, or drop cuda_graph_update")
        if trainer.strategy.root_device.type != "cuda":
            raise ConfigError(f"model.cuda_graph needs a CUDA device (the trainer runs on "
                              f"{trainer.strategy.root_device.type}): use --trainer.accelerator gpu or drop it")
        if trainer.precision == "16-mixed":  # its loss scale multiplies the backward's input, changing every step
            raise ConfigError("model.cuda_graph trains under bf16-mixed or 32-true (got --trainer.precision 16-mixed, "
                              "whose loss scaling the captured backward cannot take): use bf16-mixed or drop it")
        if trainer.world_size > 1:
            raise ConfigError(f"model.cuda_graph works on one device ({trainer.world_size} processes here): "
                              f"use --trainer.devices 1 or drop model.cuda_graph")

    # ---- one step shared by train / val / test --------------------------------------
    def model_step(self, batch: dict) -> torch.Tensor:
        return self.model.loss(batch["input_ids"], batch["labels"], seq_idx=batch.get("seq_idx"), return_state=False)[0]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self._graphed_loss is not None:
            loss = self._graphed_loss(batch["input_ids"], batch["labels"], batch.get("seq_idx"))
        elif self.initial_states.mode == "zero":
            loss = self.model_step(batch)
        else:
            loss = self.stateful_step(batch)
        # Not prog_bar: Lightning turns a progress-bar value into a number after every batch, which waits for the GPU
        # to finish the step (no overlap of the host's next step with it). Logged values stay on the device until a
        # logging step; the bar gets its own copy there (_loss_to_bar).
        self.log_step("train/loss", loss)
        self._loss_to_bar(loss)
        return loss

    def log_step(self, name: str, value) -> None:
        """A per-step training value (loss, gradient norm, initial-state RMS), given to ``self.log`` only at the steps
        whose metrics Lightning hands to the logger (every ``trainer.log_every_n_steps``): each ``self.log`` call costs
        ~0.3-0.6 ms of host time (its bookkeeping), which a CUDA-graphed step of a small model waits through, and the
        logger reads nothing in between. A value held at another step is given at the end of the batch if training
        stops there (max_time, a callback's should_stop), so the last step's values are the ones written. In
        between, ``trainer.callback_metrics`` keep the last logging step's values: ``--trainer.log_every_n_steps 1``
        gives every step's (a callback monitoring ``train/loss`` reads it at the logging steps)."""
        trainer = self._trainer
        if trainer is None or trainer._logger_connector.should_update_logs or trainer.fast_dev_run:
            self.log(name, value)
        else:
            self._held_logs[name] = value

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        held, self._held_logs = self._held_logs, {}
        if held and self.trainer._logger_connector.should_update_logs:  # training stops at this step: write them
            for name, value in held.items():
                self.log(name, value)

    def _loss_to_bar(self, loss: torch.Tensor) -> None:
        """The progress bar's ``loss``, refreshed at the logging steps (where the logger reads the loss anyway) as a
        host tensor, which the bar's refresh after every batch reads without waiting for the GPU."""
        trainer = self._trainer
        if trainer is None or trainer.progress_bar_callback is None or not trainer._logger_connector.should_update_logs:
            return
        self.log("loss", loss.detach().float().cpu(), prog_bar=True, logger=False)

    def stateful_step(self, batch: dict) -> torch.Tensor:
        """The training loss from the sample's initial state (``initial_state`` passed or noise); keeps the final."""
        trainer = self._trainer
        reduce = None
        if trainer is not None and trainer.world_size > 1:
            reduce = lambda t: trainer.strategy.reduce(t, reduce_op="mean")  # noqa: E731
        start = self.initial_states.start(self.model, batch, self.global_step, self.global_rank, reduce)
        loss, final = self.model.loss(batch["input_ids"], batch["labels"], state=start, seq_idx=batch.get("seq_idx"))
        self.initial_states.finish(final)
        rms = 0.0 if start is None else torch.stack([s.ssm.pow(2).mean() for s in start]).mean().sqrt()
        self.log_step("train/initial_state_rms", rms)  # SSM state RMS the step started from, over layers and heads
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss = self.model_step(batch)
        self.val_loss.update(loss, weight=batch["labels"].numel())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        if self.trainer.sanity_checking:
            return
        metrics = self._val_metrics(loss)
        self.log_dict(metrics, prog_bar=True, sync_dist=True)
        if self.trainer.state.fn == "fit":
            validation.write_record(self.trainer, metrics)  # this step's validation is done (see on_train_start)

    def _val_metrics(self, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        self.val_loss_best.update(loss)
        return {"val/loss": loss, "val/ppl": torch.exp(loss), "val/loss_best": self.val_loss_best.compute()}

    def on_train_start(self) -> None:
        trainer = self.trainer
        # Resumed: TensorBoard hides the interrupted run's steps past the checkpoint, which this run logs again
        tensorboard_resume.hide_replayed_steps(trainer)
        # Resumed from a checkpoint written just before a validation the interrupted run did not finish: Lightning
        # does not redo it, so the validation loss of that step is computed and logged here (training/validation.py).
        if trainer.datamodule is None or not validation.lost_on_resume(trainer):
            return
        validation.redo_validation_loss(trainer, self, trainer.datamodule.val_dataloader())
        loss = self.val_loss.compute()
        self.val_loss.reset()
        metrics = self._val_metrics(loss)
        for logger in trainer.loggers:  # at the step Lightning logs a validation after step N with: N - 1
            logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=trainer.global_step - 1)
        validation.write_record(trainer, metrics)
        rank_zero_info(f"resumed at step {trainer.global_step}, whose validation the interrupted run did not "
                       f"finish: val/loss {float(loss):.4f} (redone)")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        loss = self.model_step(batch)
        self.log("test/loss", loss, sync_dist=True)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Per-token next-token losses (b, seq_len) of a batch: `lightning-mamba predict` writes them to the run
        directory's token_losses.pt (training/predictions.py)."""
        logits, _ = self.model(batch["input_ids"], seq_idx=batch.get("seq_idx"), return_state=False)
        losses = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="none")
        return {"token_losses": losses.view_as(batch["labels"]).cpu()}

    # ---- optimizer -------------------------------------------------------------------
    def parameter_groups(self) -> list[dict]:
        """AdamW groups: no weight decay on A_log, dt_bias, D (marked _no_weight_decay), norms and biases; with
        ``a_lr_mult`` != 1 a third group, A_log and dt_bias (no weight decay either) at lr x a_lr_mult."""
        hp = self.hparams
        split = hp.get("a_lr_mult", 1.0) != 1.0  # at 1 the groups stay as before (old checkpoints resume)
        decay, no_decay, rates = [], [], []
        for name, p in self.model.named_parameters():  # by name: FSDP's shards are all 1-D
            if not p.requires_grad:
                continue
            name = unwrapped_name(name)
            if split and name in self._decay_rate_names:
                rates.append(p)
            else:
                (no_decay if name in self._no_decay_names else decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if split:
            groups.append({"params": rates, "weight_decay": 0.0, "lr": hp.lr * hp.a_lr_mult})
        return groups

    def configure_optimizers(self):
        hp = self.hparams
        fused = self.device.type == "cuda" and self.trainer.precision != "16-mixed"  # fp16 needs a grad scaler
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=hp.lr, betas=tuple(hp.betas), fused=fused)
        total = int(self.trainer.estimated_stepping_batches)
        if self._schedule_total is not None and not hp.get("replan_schedule", False):
            if self._schedule_total != total and hp.schedule != "constant":
                final = hp.lr * hp.min_lr_ratio  # where wsd and cosine end
                rank_zero_warn(f"resuming with the lr schedule of the run's {self._schedule_total} steps (this run "
                               f"goes to {total}; past the schedule's end the lr stays at its final value, {final:.3g}"
                               f"{': those steps will not change the weights' if final == 0 else ''}): "
                               f"--model.replan_schedule true plans it over {total} instead")
            total = self._schedule_total
        self._schedule_total = total
        warmup = min(hp.warmup_steps, max(0, total - 1))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, total, warmup, hp.schedule, hp.decay_fraction, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Lightning's step, or with model.cuda_graph_update: the closure (training_step, zero_grad, backward and
        their hooks), then the update as a graph replay, then the on_before_optimizer_step hooks (the NaN guard reads
        the graph's verdict; clipping ran in the graph, so configure_gradient_clipping does not run)."""
        update = self._graphed_update
        if update is None or optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        loss = optimizer_closure()
        inner = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        if not update.ready(inner):  # the first step (no optimizer state yet), or a loss that ran eagerly
            return optimizer.step(closure=lambda: loss)  # Lightning's way, the closure's work already done
        update.step(inner)
        trainer = self.trainer
        self.graphed_update_verdict = (trainer.global_step, update.bad, update.norm)
        call._call_callback_hooks(trainer, "on_before_optimizer_step", optimizer)
        call._call_lightning_module_hook(trainer, "on_before_optimizer_step", optimizer)
        self.log_step("train/grad_norm", update.norm)

    def offer_grad_norm(self, grad_norm: torch.Tensor) -> None:
        """This step's total 2-norm over all gradients, computed before clipping by someone who leaves the gradients
        as they are (the NaN guard): norm clipping then scales by it instead of computing it again (on an H200 host
        the two norms cost ~0.6 + ~0.5 ms of host time per step of the study's small cell, ~5.8 ms in all)."""
        self._offered_grad_norm = (self.trainer.global_step, grad_norm)

    def _take_offered_grad_norm(self) -> torch.Tensor | None:
        """This step's offered norm (offer_grad_norm), used once; None when none was offered for this step."""
        offered, self._offered_grad_norm = self._offered_grad_norm, None
        return offered[1] if offered is not None and offered[0] == self.trainer.global_step else None

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_val is not None and not gradient_clip_val >= 0:  # NaN too
            # a negative max norm flips every gradient (clip_grad_norm_ scales by max_norm / norm): the loss climbs
            raise ConfigError(f"trainer.gradient_clip_val must be >= 0 (got {gradient_clip_val}): the largest "
                              f"gradient norm (or value) kept; 0 or null turns clipping off")
        root = fsdp_root(self._trainer)
        if root is not None and gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm":
            # FSDP: each rank holds a shard of the gradients; the root's clip takes the norm over all of them
            # (Lightning's FSDP precision refuses norm clipping for want of the root).
            self.log_step("train/grad_norm", root.clip_grad_norm_(gradient_clip_val))
            return
        # Lightning refuses to clip for fused optimizers under mixed precision, because of fp16's grad scaler.
        # Without a scaler (fp32, bf16-mixed) the gradients are the true ones: clip them directly.
        if self.trainer.precision == "16-mixed":
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm":
            grad_norm = self._take_offered_grad_norm()
            if grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(self.parameters(), gradient_clip_val, grad_norm)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
            self.log_step("train/grad_norm", grad_norm)
            return
        if root is None:  # (under FSDP a rank's own norm is its shard's: the root's clip above gives the global one)
            self._log_unclipped_grad_norm()
        if gradient_clip_val:
            torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)

    def _log_unclipped_grad_norm(self) -> None:
        """Without norm clipping (trainer.gradient_clip_val 0 or null, or gradient_clip_algorithm value) the gradient
        norm is still logged as train/grad_norm (before a value clip): the NaN guard's, else computed at the logging
        steps only. It used to vanish from TensorBoard and callback_metrics when clipping was turned off."""
        grad_norm = self._take_offered_grad_norm()
        if grad_norm is not None:
            self.log_step("train/grad_norm", grad_norm)
        elif self.trainer._logger_connector.should_update_logs:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            if grads:
                self.log_step("train/grad_norm", torch.nn.utils.get_total_norm(grads))

    # ---- throughput --------------------------------------------------------------------
    @property
    def flops_per_batch(self) -> int | None:
        """Estimated training FLOPs of the current batch shape (for MFU): models/flops.py per token x tokens."""
        shape = getattr(self, "_last_batch_shape", None)
        if shape is None:
            return None
        b, l = shape
        return b * l * train_flops_per_token(self.config, seq_len=l)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self._last_batch_shape = tuple(batch["input_ids"].shape)
        self._tokens_trained += batch["input_ids"].numel() * (self.trainer.world_size if self._trainer else 1)

    # ---- checkpoint metadata -------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Everything needed to use the checkpoint without the run's data module: the official config,
        # the tokenizer and the training length.
        meta = {"mamba_config": self.config.to_dict()}
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            meta["seq_len"] = dm.hparams.seq_len
            meta["tokenizer"] = dm.tokenizer.to_spec()
            if hasattr(dm, "split_settings"):
                meta["data"] = dm.split_settings()  # the held-out split analyze/mitigate evaluate on by default
        checkpoint["lightning_mamba"] = meta
        if self._schedule_total is not None:  # training state, beside the model's metadata
            checkpoint["lr_schedule"] = {"total_steps": self._schedule_total}
        checkpoint["tokens_trained"] = self._tokens_trained  # with global_step: --model.pretrained's line tells them
        if self.initial_states.mode != "zero":  # the carried state of every process (DDP: a gather on each rank)
            world = self.trainer.world_size if self._trainer is not None else 1
            checkpoint["initial_states"] = self.initial_states.state_dict(self.all_gather, world)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Before Lightning loads the weights (--ckpt_path): one line naming what differs, not a size-mismatch dump.
        trainer = self._trainer
        path = (trainer.ckpt_path if trainer is not None else None) or "(given)"
        check_intact(checkpoint, path)  # the CLI checked it already (check_resume); Trainer.fit(ckpt_path=) had not
        check_tokenizer(checkpoint, getattr(trainer, "datamodule", None), path)
        check_model_shape(checkpoint, self, path)
        self._schedule_total = (checkpoint.get("lr_schedule") or {}).get("total_steps")
        self._tokens_trained = checkpoint.get("tokens_trained", 0)
        if "initial_states" in checkpoint:
            rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
            self.initial_states.load_state_dict(checkpoint["initial_states"], rank, world)


def check_optimizer_settings(weight_decay: float, betas, warmup_steps: int, decay_fraction: float,
                             min_lr_ratio: float) -> None:
    """Reject optimizer settings that cannot work, with one line naming the setting (before any training)."""
    if weight_decay < 0:
        raise ConfigError(f"model.weight_decay must be >= 0 (got {weight_decay})")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"model.betas must be two numbers in [0, 1), e.g. [0.9, 0.95] (got {list(betas)})")
    if warmup_steps < 0:
        raise ConfigError(f"model.warmup_steps must be >= 0 (got {warmup_steps})")
    if not 0 <= decay_fraction <= 1:
        raise ConfigError(f"model.decay_fraction must be in [0, 1] (got {decay_fraction})")
    if not 0 <= min_lr_ratio <= 1:
        raise ConfigError(f"model.min_lr_ratio must be in [0, 1] (got {min_lr_ratio})")
