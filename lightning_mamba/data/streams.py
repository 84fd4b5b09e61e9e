"""Training on contiguous lanes of the token stream, for state passing (truncated BPTT across batches).

The training stream is cut into ``n_lanes = world_size * batch_size`` lanes of equal length, each a contiguous
stretch of ``chunks`` samples of ``seq_len`` tokens (lane ``j`` = packed samples ``j * chunks ... (j + 1) *
chunks - 1``). Rank ``r`` owns lanes ``r * batch_size ... (r + 1) * batch_size - 1``, and its batch ``k``, row
``i`` is chunk ``k`` of its lane ``i``: row ``i`` of batch ``k + 1`` continues row ``i`` of batch ``k`` exactly, so
the model can start it from that row's final state. An epoch is ``chunks`` batches and visits every packed
sample once (all ranks together); only the tail that does not fill a chunk of every lane is left out.

Each sample carries ``state_reset``: True where the row must start from a fresh state instead of the carried
one: at a lane's first chunk (each epoch start), and, when ``seq_idx`` resets the state at documents, where a
chunk starts a new document (the chunk before ended with EOS).
"""

from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from .errors import DataError
from .packed import PackedTextDataset
from .sampler import ResumableSampler


class TextLanes(PackedTextDataset):
    """The packed samples of ``tokens`` as ``n_lanes`` lanes of ``chunks`` consecutive samples each.

    Index ``j * chunks + k`` is chunk ``k`` of lane ``j``: the packed sample of that index (so the lanes tile
    the stream in order), plus a bool ``state_reset`` (see the module docstring).

    Args:
        tokens: The flat token stream.
        seq_len: Tokens per sample (chunk).
        n_lanes: Lanes over all processes (``world_size * batch_size``).
        emit_seq_idx: Add ``seq_idx`` (document resets inside a sample) and reset at chunks that start a document.
        eos_id: The tokenizer's EOS id (needed with ``emit_seq_idx``).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, n_lanes: int, emit_seq_idx: bool = False,
                 eos_id: int | None = None):
        super().__init__(tokens, seq_len, emit_seq_idx=emit_seq_idx, eos_id=eos_id)
        if n_lanes < 1:
            raise DataError(f"the number of lanes must be >= 1 (got {n_lanes})")
        self.n_lanes = n_lanes
        self.chunks = super().__len__() // n_lanes
        if self.chunks == 0:
            raise DataError(f"data.state_passing: the training split ({len(tokens)} tokens) has fewer than one sample "
                            f"of seq_len={seq_len} per lane ({n_lanes} lanes = batch_size x processes): use a smaller "
                            f"batch_size or seq_len, or a larger corpus")

    def __len__(self) -> int:
        return self.n_lanes * self.chunks

    def lane_and_chunk(self, i: int) -> tuple[int, int]:
        """(lane, chunk within the lane) of sample ``i``."""
        return divmod(i, self.chunks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(i)  # IndexError past the lanes' end (len(self) is theirs)
        reset = i % self.chunks == 0
        if not reset and self.emit_seq_idx:
            reset = int(self.tokens[i * self.seq_len - 1]) == self.eos_id  # the chunk before ended a document
        sample["state_reset"] = torch.tensor(reset)
        return sample


class LaneSampler(ResumableSampler):
    """The order of :class:`TextLanes`: batch ``k`` of rank ``r`` is chunk ``k`` of each of the rank's lanes.

    Same position bookkeeping as :class:`ResumableSampler` (``advance``, ``state_dict``: epoch and samples of
    all ranks consumed), so a resumed run continues at the very chunk it stopped at; the order is the same every
    epoch (the lanes restart from their beginning).

    Args:
        lanes: Lanes per rank (the batch size).
        chunks: Chunks per lane (batches per epoch).
        num_replicas: Number of processes (DDP world size).
        rank: This process's rank.
    """

    def __init__(self, lanes: int, chunks: int, num_replicas: int = 1, rank: int = 0):
        self.lanes, self.chunks = lanes, chunks
        super().__init__(num_replicas * lanes * chunks, seed=0, num_replicas=num_replicas, rank=rank)

    def order(self, epoch: int) -> np.ndarray:
        # ResumableSampler hands position (k * lanes + i) * R + r to rank r as its batch k, row i: put chunk k of
        # lane r * lanes + i there, i.e. the (R, lanes, chunks) grid of samples read chunk-major.
        grid = np.arange(self.size).reshape(self.num_replicas, self.lanes, self.chunks)
        return grid.transpose(2, 1, 0).ravel()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "lanes": self.lanes * self.num_replicas}

    def load_state_dict(self, state: dict) -> None:
        if state.get("lanes") != self.lanes * self.num_replicas:
            # another lane layout (or a shuffled run's position): the saved position means nothing here
            rank_zero_warn(f"the checkpoint's training position is not one of {self.lanes * self.num_replicas} lanes "
                           f"(lanes then: {state.get('lanes')}): epoch {state.get('epoch', 0)} restarts from its "
                           f"first chunk")
            self.epoch, self.consumed = int(state.get("epoch", 0)), 0
            return
        super().load_state_dict(state)
