"""What a training sample's recurrent state starts from: the training interventions of Buitrago Ruiz & Gu (2025).

Samples normally start from the zero state, so the model only ever sees states reachable within ``seq_len``
tokens, and may never learn to handle (or forget) the larger states of longer inputs. Two interventions expose
it to such states while training at the same length:

- ``passed`` (state passing, truncated BPTT): each sample starts from the final state of the previous batch's
  same row, detached, which with ``data.state_passing`` is the text just before it; rows restart from zero where
  the batch's ``state_reset`` says so (each epoch start, document starts with seq_idx resets). The carried state
  is part of the checkpoint, so a resumed run continues with exactly the state it had.
- ``noise``: each sample starts from Gaussian noise, per (layer, head) of standard deviation ``noise_scale`` x the
  RMS of the model's own final SSM states (measured on the training batch from a zero start, without gradients,
  at the first step and every ``calibrate_every`` steps). The convolution state stays zero. The noise is seeded
  by (seed, step, rank), so a resumed run draws the same noise.

The state structure is :meth:`MambaLM.empty_state`'s: one ``LayerState(conv, ssm)`` per layer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ..models import ConfigError, MambaLM
from ..models.lm import State
from ..models.mixer import LayerState

MODES = ("zero", "passed", "noise")
LARGE_CARRIED_BYTES = 1 << 30  # a checkpoint holding more carried state than this says so, once
NEEDS_LANES = ("model.initial_state=passed starts each sample from the previous batch's final state, which needs "
               "batches that continue each other: set data.state_passing true (or model.initial_state zero or noise)")


class InitialStates:
    """The initial states of the training samples, and what they carry between steps (see the module docstring).

    Args:
        mode: 'zero', 'passed' or 'noise'.
        noise_scale: 'noise': standard deviation in units of the measured RMS of the final states.
        calibrate_every: 'noise': re-measure that RMS every this many steps.
    """

    def __init__(self, mode: str = "zero", noise_scale: float = 1.0, calibrate_every: int = 50):
        if mode not in MODES:
            raise ConfigError(f"model.initial_state={mode!r} is unknown: use one of {', '.join(MODES)}")
        if not noise_scale >= 0:
            raise ConfigError(f"model.noise_scale must be >= 0 (got {noise_scale})")
        if calibrate_every < 1:
            raise ConfigError(f"model.noise_calibrate_every must be >= 1 (got {calibrate_every})")
        self.mode, self.noise_scale, self.calibrate_every = mode, noise_scale, calibrate_every
        self.seed = torch.initial_seed()  # seed_everything's seed: the same again in a resumed run
        self.carried: State | None = None  # 'passed': the last batch's final state, detached
        self.noise_rms: Tensor | None = None  # 'noise': (n_layer, nheads) RMS of the final SSM states
        self._warned = False
        self._size_told = False

    # ---- one training step ---------------------------------------------------------------------------
    def start(self, model: MambaLM, batch: dict, step: int = 0, rank: int = 0,
              reduce: Callable[[Tensor], Tensor] | None = None) -> State | None:
        """The initial state for ``batch`` (None: zero). ``reduce`` averages a tensor over processes (DDP)."""
        if self.mode == "passed":
            return self.passed(batch)
        if self.mode == "noise":
            if self.noise_rms is None or step % self.calibrate_every == 0:
                self.calibrate(model, batch, reduce)
            return self.noise(model, batch["input_ids"].size(0), batch["input_ids"].device, step, rank)
        return None

    def finish(self, final: State) -> None:
        """Keep the step's final state (detached) for the next batch ('passed'). A row whose state is not finite
        anywhere (a step NanGuard skips) is kept as zeros: its lane restarts instead of passing NaNs on."""
        if self.mode != "passed":
            return
        finite = torch.stack([torch.cat([s.conv.flatten(1), s.ssm.flatten(1)], 1).isfinite().all(1) for s in final])
        finite = finite.all(0)  # (b,): no host sync
        self.carried = [LayerState(torch.where(finite[:, None, None], s.conv.detach(), 0),
                                   torch.where(finite[:, None, None, None], s.ssm.detach(), 0)) for s in final]

    # ---- passed -----------------------------------------------------------------------------------
    def passed(self, batch: dict) -> State | None:
        """The carried state, restarted (zero) in the rows whose ``state_reset`` is set (None: all zero)."""
        if "state_reset" not in batch:
            raise ConfigError(NEEDS_LANES)
        reset = batch["state_reset"].bool().view(-1)
        carried = self.carried
        if carried is not None and carried[0].ssm.size(0) != reset.numel():
            carried = None  # another batch size than the checkpoint's
        if carried is None:
            if not self._warned and not reset.all():
                self._warned = True
                rank_zero_warn("model.initial_state=passed: no carried state for a batch that continues its lanes (a "
                               "checkpoint without one, or another batch size): its rows start from zero")
            return None
        keep = ~reset.to(batch["input_ids"].device)
        return [LayerState(torch.where(keep[:, None, None], s.conv.to(keep.device), 0),
                           torch.where(keep[:, None, None, None], s.ssm.to(keep.device), 0)) for s in carried]

    # ---- noise ------------------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, model: MambaLM, batch: dict, reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Measure the per-(layer, head) RMS of the final SSM states of ``batch`` from a zero start."""
        _, final = model(batch["input_ids"], seq_idx=batch.get("seq_idx"))
        mean_square = torch.stack([s.ssm.float().pow(2).mean(dim=(0, 2, 3)) for s in final])  # (n_layer, nheads)
        if reduce is not None:
            mean_square = reduce(mean_square)
        self.noise_rms = mean_square.sqrt()
        return self.noise_rms

    def noise(self, model: MambaLM, batch_size: int, device, step: int, rank: int = 0) -> State:
        """Zero conv states and Gaussian SSM states of std ``noise_scale * noise_rms[layer, head]``."""
        seed = int(np.random.SeedSequence([self.seed, step, rank]).generate_state(1, np.uint64)[0])
        generator = torch.Generator(device=device).manual_seed(seed)
        std = (self.noise_scale * self.noise_rms).to(device)
        return [LayerState(s.conv, torch.randn(s.ssm.shape, generator=generator, device=device) * std[i][:, None, None])
                for i, s in enumerate(model.empty_state(batch_size, device))]

    # ---- checkpoints -------------------------------------------------------------------------------
    def state_dict(self, gather: Callable[[list[Tensor]], list[Tensor]] | None = None, world_size: int = 1) -> dict:
        """Plain tensors and lists (loadable with ``weights_only``). The carried state of every process: ``gather``
        collects a list of tensors from all ``world_size`` processes (each with a leading process dimension)."""
        out: dict = {"mode": self.mode}
        if self.noise_rms is not None:
            out["noise_rms"] = self.noise_rms.detach().cpu()
        if self.carried is not None:
            tensors = [t for s in self.carried for t in s]
            tensors = gather(tensors) if gather is not None and world_size > 1 else [t[None] for t in tensors]
            out["carried"] = {"world_size": world_size, "tensors": [t.detach().cpu() for t in tensors]}
            self._tell_size(tensors)
        return out

    def _tell_size(self, tensors: list[Tensor]) -> None:
        """A d_state 1024 model at 256 lanes carries 2.1 GB (lanes x layers x heads x headdim x d_state, fp32):
        say once why its checkpoints are that large, and what makes them smaller."""
        if self._size_told:
            return
        size = sum(t.numel() * t.element_size() for t in tensors)
        if size < LARGE_CARRIED_BYTES:
            return
        self._size_told = True
        rank_zero_warn(f"model.initial_state=passed: each checkpoint holds the carried state of every lane, "
                       f"{size / 1e9:.1f} GB (so a resumed run continues each lane exactly); fewer lanes "
                       f"(data.batch_size) or fewer checkpoints (ModelCheckpoint every_n_train_steps) make less of it")

    def load_state_dict(self, state: dict, rank: int = 0, world_size: int = 1) -> None:
        self.noise_rms = state.get("noise_rms")
        self.carried = None
        carried = state.get("carried")
        if carried is None or self.mode != "passed":
            return
        if carried["world_size"] != world_size:
            rank_zero_warn(f"the checkpoint's carried states are of {carried['world_size']} processes, this run has "
                           f"{world_size}: the lanes restart from zero states")
            return
        tensors = [t[rank] for t in carried["tensors"]]
        self.carried = [LayerState(conv, ssm) for conv, ssm in zip(tensors[::2], tensors[1::2])]
