"""Documents -> one flat token stream -> fixed-length training samples.

The stream is ``doc0 EOS doc1 EOS ... docN EOS``. Sample i is the block ``stream[i*L : i*L + L + 1]``
(L = seq_len): inputs are its first L tokens, labels its last L. Consecutive blocks share one boundary
token, so every token after the first is a prediction target exactly once and none is lost (only the
tail shorter than a block is unused). Samples cut across documents: the state starts at zero at each
sample start, and, with ``seq_idx``, also after each EOS inside a sample.

The train/val split is by document, so no held-out text is ever trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate
from tqdm import tqdm

from .errors import DataError
from .tokenization import Tokenizer

PACKING_VERSION = 1  # bump when the stream layout changes: it is part of the token-cache fingerprint
ENCODE_BATCH_DOCS = 64  # documents per encode_batch call: parallel inside, progress between calls


def split_documents(n_documents: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the (train, val) documents: a seeded random choice of ``round(n * val_fraction)``
    documents (at least one, leaving at least one) is held out; both lists keep the corpus order."""
    if n_documents < 2:
        raise DataError(f"the corpus has {n_documents} document(s), but a train/val split by document needs "
                        f"at least 2: add documents, or split a text file into several files")
    n_val = min(max(round(n_documents * val_fraction), 1), n_documents - 1)
    held_out = np.random.default_rng(seed).permutation(n_documents)[:n_val]
    is_val = np.zeros(n_documents, dtype=bool)
    is_val[held_out] = True
    return np.flatnonzero(~is_val).tolist(), np.flatnonzero(is_val).tolist()


def encode_documents(tokenizer: Tokenizer, documents: Sequence[str], dtype: np.dtype = np.dtype(np.int64),
                     desc: str = "tokenizing") -> np.ndarray:
    """``doc0 EOS doc1 EOS ...`` as one flat array, with a progress bar over documents (on a terminal)."""
    pieces = []
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    with tqdm(total=len(documents), desc=desc, unit="doc", disable=None) as bar:
        for start in range(0, len(documents), ENCODE_BATCH_DOCS):
            batch = documents[start:start + ENCODE_BATCH_DOCS]
            for ids in tokenizer.encode_batch(batch):
                pieces += [np.asarray(ids, dtype=dtype), eos]
            bar.update(len(batch))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def document_index(input_ids: np.ndarray, eos_id: int) -> np.ndarray:
    """0 at the first position, +1 after each EOS (the EOS belongs to the document it ends)."""
    seq_idx = np.zeros(len(input_ids), dtype=np.int32)
    np.cumsum(input_ids[:-1] == eos_id, out=seq_idx[1:])
    return seq_idx


class PackedTextDataset(Dataset):
    """Non-overlapping ``seq_len + 1``-token blocks of a flat token array (a memory map is read lazily).

    Each sample is a dict: ``input_ids`` and ``labels`` (LongTensor, seq_len), and with ``emit_seq_idx``
    an int32 ``seq_idx`` (seq_len) numbering the documents inside the sample, for state resets at EOS."""

    def __init__(self, tokens: np.ndarray, seq_len: int, emit_seq_idx: bool = False, eos_id: int | None = None):
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1 (got {seq_len})")
        if len(tokens) < seq_len + 1:
            raise DataError(f"seq_len={seq_len} needs at least {seq_len + 1} tokens, but there are {len(tokens)}")
        if emit_seq_idx and eos_id is None:
            raise ValueError("emit_seq_idx needs the tokenizer's eos_id")
        self.tokens, self.seq_len, self.emit_seq_idx, self.eos_id = tokens, seq_len, emit_seq_idx, eos_id

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def start(self, i):
        """Where sample ``i`` starts in the stream (``i`` an int or an array of them)."""
        return i * self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        start = self.start(i)
        block = np.array(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)  # a copy: torch wants it writable
        sample = {"input_ids": torch.from_numpy(block[:-1]), "labels": torch.from_numpy(block[1:])}
        if self.emit_seq_idx:
            sample["seq_idx"] = torch.from_numpy(document_index(block[:-1], self.eos_id))
        return sample

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """A whole batch in one gather: the DataLoader calls this instead of ``__getitem__`` per sample. At the
        study's shapes (256 windows a step, a step every few ms on a GPU) slicing and collating sample by sample
        cost the host more time than the GPU's step. Returns the collated dict (:func:`collate_samples` passes it
        on); a subclass with its own ``__getitem__`` gets the per-sample list."""
        if type(self).__getitem__ is not PackedTextDataset.__getitem__:
            return [self[i] for i in indices]
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and not (idx.min() >= 0 and idx.max() < len(self)):
            raise IndexError(f"samples {idx.min()}..{idx.max()} out of range for {len(self)} samples")
        starts = self.start(idx)  # start() is affine in i: it takes an array as well
        blocks = np.asarray(self.tokens[starts[:, None] + np.arange(self.seq_len + 1)], dtype=np.int64)
        # contiguous: the copy to the GPU would first copy a strided view into unpinned memory, a copy that may wait
        # for the GPU's queue (the DataLoader pins these when training on a GPU)
        batch = {"input_ids": torch.from_numpy(np.ascontiguousarray(blocks[:, :-1])),
                 "labels": torch.from_numpy(np.ascontiguousarray(blocks[:, 1:]))}
        if self.emit_seq_idx:
            seq_idx = np.zeros((len(idx), self.seq_len), dtype=np.int32)
            np.cumsum(blocks[:, :-2] == self.eos_id, axis=1, out=seq_idx[:, 1:])
            batch["seq_idx"] = torch.from_numpy(seq_idx)
        return batch


def collate_samples(batch):
    """The DataLoader's collate: a batch :meth:`PackedTextDataset.__getitems__` gathered whole passes as it is,
    a list of samples is stacked as usual."""
    return batch if isinstance(batch, dict) else default_collate(batch)


class WindowTextDataset(PackedTextDataset):
    """Every ``seq_len + 1``-token window of a flat token array, indexed by its start offset (``data.sampling
    random_windows``: :class:`~.sampler.RandomWindowSampler` draws the offsets). Samples as PackedTextDataset's."""

    def __len__(self) -> int:
        return len(self.tokens) - self.seq_len  # offsets 0 .. len - seq_len - 1: the window's last token exists

    def start(self, i):
        return i
