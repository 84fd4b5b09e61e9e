"""The training order: a seeded shuffle per epoch that a resumed run continues exactly where it stopped.

Epoch ``e`` visits the samples in a permutation drawn from ``(seed, e)`` alone, so any process can recompute
it. The sampler's state is ``(epoch, consumed)``: how many samples of that permutation the trainer has
already trained on (counted by the data module as batches reach the training step, not as the DataLoader
fetches them, which runs ahead). A sampler loaded with that state yields exactly the rest of the epoch.

With several processes (DDP), rank ``r`` of ``R`` takes positions ``r, r + R, r + 2R, ...`` of the remaining
permutation; ``consumed`` counts samples of all ranks. It subclasses ``DistributedSampler`` only so that
Lightning uses it as it is instead of wrapping it in one of its own.

:class:`RandomWindowSampler` (``data.sampling random_windows``) keeps all of that but draws, instead of a
permutation of fixed blocks, ``windows_per_epoch`` window offsets uniformly over the training stream from
``(seed, epoch)``: no window is trained on twice (bar chance), and a resumed run draws exactly the windows the
uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DistributedSampler

# The counts a sampler's state holds (whole numbers >= 0) and load_state_dict reads: checked in a checkpoint before
# Lightning hands it over (training.checkpoint_io.check_intact)
POSITION_KEYS = ("epoch", "consumed", "epoch_offset")


class ResumableSampler(DistributedSampler):
    """Seeded, epoch-aware shuffle of ``range(num_samples)`` that resumes mid-epoch (see the module docstring).

    Each rank gets ``num_samples // num_replicas`` samples per epoch (the tail that does not fill a round of
    all ranks is left out, a different tail each epoch)."""

    def __init__(self, num_samples: int, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.size = num_samples
        self.per_rank = num_samples // num_replicas
        self.consumed = 0  # samples of this epoch's permutation trained on, all ranks together
        # Lightning's epoch number minus this order's: a run that stopped mid-epoch (max_steps) counts the epoch as
        # done, so when it is resumed Lightning's next epoch is the rest of this order's (see TextDataModule.state_dict)
        self.epoch_offset = 0

    kind = "blocks"  # what the indices mean: a checkpoint of another kind of sampler does not resume this one

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of epoch ``epoch`` (the same in every process and every run)."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def __iter__(self) -> Iterator[int]:
        start, stop = self.consumed, self.per_rank * self.num_replicas
        yield from self.order(self.epoch)[start + self.rank:stop:self.num_replicas].tolist()

    def __len__(self) -> int:
        return self.per_rank  # a whole epoch, also when resuming: Lightning counts the batches already done

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at each epoch start, also the resumed one, which must keep its position."""
        epoch -= self.epoch_offset
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def advance(self, local_samples: int) -> None:
        """Record that this rank trained on ``local_samples`` more samples (and every other rank as many)."""
        self.consumed += local_samples * self.num_replicas

    def batches_left(self, batch_size: int) -> int:
        """Whole batches of ``batch_size`` (per rank) this epoch still has."""
        return (self.per_rank - self.consumed // self.num_replicas) // batch_size

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "consumed": self.consumed, "num_samples": self.size, "seed": self.seed}
        if self.epoch_offset:
            state["epoch_offset"] = self.epoch_offset
        return state if self.kind == "blocks" else {**state, "kind": self.kind}  # blocks: the format of old checkpoints

    def identity(self) -> dict:
        """What the order depends on besides the epoch (a state saved under other values does not resume it)."""
        return {"kind": self.kind, "num_samples": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.epoch_offset = int(state["epoch"]), int(state.get("epoch_offset", 0))
        saved = {k: state.get(k, "blocks" if k == "kind" else None) for k in self.identity()}
        if saved != self.identity():
            # another order: the saved position means nothing in it, so the interrupted epoch starts over
            then = ", ".join(f"{k} {v}" for k, v in saved.items())
            now = ", ".join(f"{k} {v}" for k, v in self.identity().items())
            rank_zero_warn(f"the training data changed since the checkpoint ({then} then; {now} now): epoch "
                           f"{self.epoch} restarts from its first sample")
            self.consumed = 0
        else:
            self.consumed = int(state["consumed"])


class RandomWindowSampler(ResumableSampler):
    """``windows_per_epoch`` window start offsets per epoch, each uniform in ``[0, num_offsets)`` and drawn from
    ``(seed, epoch)`` alone; resumes mid-epoch like :class:`ResumableSampler` (the same ``epoch``/``consumed``
    state, plus the stream's size). The dataset it indexes maps an offset to the window starting there."""

    kind = "random_windows"

    def __init__(self, num_offsets: int, windows_per_epoch: int, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        if num_offsets < 1:
            raise ValueError(f"num_offsets must be >= 1 (got {num_offsets})")
        super().__init__(windows_per_epoch, seed=seed, num_replicas=num_replicas, rank=rank)
        self.num_offsets = num_offsets

    def order(self, epoch: int) -> np.ndarray:
        """The offsets of epoch ``epoch`` (the same in every process and every run)."""
        return np.random.default_rng([self.seed, 0x3A1D0, epoch]).integers(0, self.num_offsets, size=self.size)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "num_offsets": self.num_offsets}

    def identity(self) -> dict:
        return {**super().identity(), "num_offsets": self.num_offsets}
