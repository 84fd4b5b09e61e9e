import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from lightning_mamba.data import (
    ByteTokenizer,
    DataError,
    PackedTextDataset,
    WindowTextDataset,
    encode_documents,
    split_documents,
)
from lightning_mamba.data.packed import collate_samples


def stream_from_labels(dataset: PackedTextDataset) -> np.ndarray:
    """The first input token, then every label: what the blocks let the model see and predict."""
    samples = [dataset[i] for i in range(len(dataset))]
    return torch.cat([samples[0]["input_ids"][:1]] + [s["labels"] for s in samples]).numpy()


@pytest.mark.parametrize("seq_len", [2, 7, 64])
def test_packing_loses_and_duplicates_no_token(seq_len):
    tokens = np.arange(1000, dtype=np.uint16)  # distinct values: any duplicate or gap would show
    dataset = PackedTextDataset(tokens, seq_len)
    assert len(dataset) == (len(tokens) - 1) // seq_len
    for i in range(len(dataset)):
        s = dataset[i]
        assert s["input_ids"].shape == s["labels"].shape == (seq_len,)
        assert s["input_ids"].dtype == s["labels"].dtype == torch.long
        assert torch.equal(s["input_ids"][1:], s["labels"][:-1])  # labels are the inputs shifted by one
    used = len(dataset) * seq_len + 1
    np.testing.assert_array_equal(stream_from_labels(dataset), tokens[:used])
    assert len(tokens) - used < seq_len  # only a tail shorter than one sample is unused


def test_documents_are_joined_with_eos():
    tok = ByteTokenizer()
    stream = encode_documents(tok, ["ab", "é", "c"], np.dtype(np.uint16))
    assert stream.tolist() == [97, 98, 256, 0xC3, 0xA9, 256, 99, 256]
    assert stream.dtype == np.uint16


def test_seq_idx_counts_documents_within_each_sample():
    E = 9
    tokens = np.array([1, 2, E, 3, E, E, E, 4, 5, 6, E, 7, 8], dtype=np.uint16)
    dataset = PackedTextDataset(tokens, seq_len=6, emit_seq_idx=True, eos_id=E)
    first, second = dataset[0], dataset[1]
    assert first["input_ids"].tolist() == [1, 2, E, 3, E, E]
    assert first["seq_idx"].tolist() == [0, 0, 0, 1, 1, 2]  # the EOS belongs to the document it ends
    assert second["input_ids"].tolist() == [E, 4, 5, 6, E, 7]
    assert second["seq_idx"].tolist() == [0, 1, 1, 1, 1, 2]  # restarts at 0 in each sample
    assert first["seq_idx"].dtype == torch.int32
    assert "seq_idx" not in PackedTextDataset(tokens, seq_len=6)[0]


def test_dataset_bounds():
    with pytest.raises(DataError, match="needs at least 11 tokens"):
        PackedTextDataset(np.arange(10), seq_len=10)
    with pytest.raises(IndexError):
        PackedTextDataset(np.arange(10), seq_len=3)[3]


def test_split_is_by_document_disjoint_and_seeded():
    train, val = split_documents(100, 0.1, seed=0)
    assert len(val) == 10 and sorted(train + val) == list(range(100))
    assert not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)  # corpus order kept inside each split
    assert (train, val) == split_documents(100, 0.1, seed=0)
    assert val != split_documents(100, 0.1, seed=1)[1]


def test_split_keeps_at_least_one_document_each_side():
    assert [len(part) for part in split_documents(2, 0.01, 0)] == [1, 1]
    assert [len(part) for part in split_documents(3, 0.99, 0)] == [1, 2]
    with pytest.raises(DataError, match="has 1 document"):
        split_documents(1, 0.5, 0)


@pytest.mark.parametrize("kind", [PackedTextDataset, WindowTextDataset])
@pytest.mark.parametrize("emit_seq_idx", [False, True])
def test_a_batch_gathered_whole_equals_the_samples_collated(tmp_path, kind, emit_seq_idx):
    """__getitems__ (one gather per batch, what the DataLoader calls) gives what per-sample slicing + collate gives,
    also from a memory map, and through a DataLoader with the data module's collate."""
    E = 9
    rng = np.random.default_rng(0)
    path = tmp_path / "tokens.npy"
    np.save(path, rng.integers(0, 12, size=2000).astype(np.uint16))
    tokens = np.load(path, mmap_mode="r")
    dataset = kind(tokens, seq_len=16, emit_seq_idx=emit_seq_idx, eos_id=E)
    indices = [0, 5, len(dataset) - 1, 5, 77]
    whole = dataset.__getitems__(indices)
    one_by_one = default_collate([dataset[i] for i in indices])
    assert whole.keys() == one_by_one.keys()
    for key in whole:
        assert whole[key].dtype == one_by_one[key].dtype
        assert torch.equal(whole[key], one_by_one[key])
        assert whole[key].is_contiguous()  # a strided view would be copied to unpinned memory on its way to a GPU
    loader = DataLoader(dataset, batch_size=5, sampler=indices, collate_fn=collate_samples)
    assert all(torch.equal(a, b) for a, b in zip(next(iter(loader)).values(), whole.values()))
    with pytest.raises(IndexError):
        dataset.__getitems__([0, len(dataset)])
