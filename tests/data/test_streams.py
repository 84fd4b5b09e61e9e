"""Lanes for state passing: contiguous, continued exactly from batch to batch, every token once per epoch (also
over several ranks), resumable mid-epoch, restarted at epoch and (with seq_idx) document starts."""

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from torch.utils.data import DataLoader

from lightning_mamba.data import DataError, LaneSampler, PasskeyDataModule, TextDataModule, TextLanes


def batches(dataset: TextLanes, lanes: int, num_replicas: int = 1, rank: int = 0, state: dict | None = None):
    sampler = LaneSampler(lanes, dataset.chunks, num_replicas=num_replicas, rank=rank)
    if state is not None:
        sampler.load_state_dict(state)
    return list(DataLoader(dataset, batch_size=lanes, sampler=sampler, drop_last=True))


def test_rows_continue_their_lane_exactly_from_batch_to_batch(text_dir, tmp_path):
    dm = TextDataModule(source=text_dir, tokenizer="byte", seq_len=32, batch_size=4, val_fraction=0.2,
                        cache_dir=str(tmp_path / "cache"), state_passing=True)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    got = list(loader)
    tokens = torch.from_numpy(np.asarray(dm.train_tokens(), dtype=np.int64))
    chunks = loader.dataset.chunks
    assert len(got) == len(loader) == chunks == (len(tokens) - 1) // 32 // 4  # an epoch: one pass over the lanes
    for k, batch in enumerate(got):
        assert batch["input_ids"].shape == (4, 32) and torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
        assert batch["state_reset"].tolist() == [k == 0] * 4  # the lanes restart at each epoch start only
        if k:  # row i of batch k continues row i of batch k - 1: its first input is that row's last label
            assert torch.equal(batch["input_ids"][:, 0], got[k - 1]["labels"][:, -1])
    for i in range(4):  # lane i, read through the epoch, is one contiguous stretch of the stream
        lane = torch.cat([got[0]["input_ids"][i, :1]] + [b["labels"][i] for b in got])
        start = i * chunks * 32
        assert torch.equal(lane, tokens[start:start + chunks * 32 + 1])


@pytest.mark.parametrize("num_replicas", [1, 2])
def test_every_sample_once_per_epoch_over_lanes_and_ranks(num_replicas):
    tokens = np.arange(2000)  # distinct values: a duplicate or a gap would show
    lanes = 3
    dataset = TextLanes(tokens, 16, num_replicas * lanes)
    starts = []
    for rank in range(num_replicas):
        got = batches(dataset, lanes, num_replicas, rank)
        assert len(got) == dataset.chunks
        first = got[0]["input_ids"][:, 0] // (dataset.chunks * 16)  # the lane each row reads
        assert first.tolist() == [rank * lanes + i for i in range(lanes)]  # the rank's own lanes
        starts += [int(t) for b in got for t in b["input_ids"][:, 0]]
    assert sorted(starts) == [i * 16 for i in range(len(dataset))]  # every sample once, all ranks together
    assert len(tokens) - (len(dataset) * 16 + 1) < num_replicas * lanes * 16  # only a tail is left out


@pytest.mark.parametrize("num_replicas", [1, 2])
def test_a_loaded_position_continues_at_the_next_chunk(num_replicas):
    dataset = TextLanes(np.arange(3000), 16, num_replicas * 4)
    sampler = LaneSampler(4, dataset.chunks, num_replicas=num_replicas)
    sampler.set_epoch(1)
    sampler.advance(4 * 3)  # three batches trained on (by every rank)
    state = sampler.state_dict()
    assert state["consumed"] == 12 * num_replicas and state["lanes"] == 4 * num_replicas and state["epoch"] == 1
    for rank in range(num_replicas):
        full = batches(dataset, 4, num_replicas, rank)
        rest = batches(dataset, 4, num_replicas, rank, state)
        assert len(rest) == len(full) - 3
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(rest, full[3:]))


def test_another_lane_layout_restarts_the_epoch_with_a_warning():
    sampler = LaneSampler(4, 10)
    with pytest.warns(UserWarning, match="restarts from its first chunk"):
        sampler.load_state_dict({"epoch": 2, "consumed": 8, "num_samples": 60, "seed": 0, "lanes": 6})
    assert sampler.epoch == 2 and sampler.consumed == 0
    with pytest.warns(UserWarning, match="restarts from its first chunk"):  # a shuffled run's position
        sampler.load_state_dict({"epoch": 0, "consumed": 8, "num_samples": 40, "seed": 0})
    assert sampler.consumed == 0


def test_with_seq_idx_a_chunk_that_starts_a_document_restarts():
    eos = 9
    tokens = np.array([1, 2, 3, 4, 5, eos, 6, 7, 8, 1, eos, 2, 3, 4, 5, 6], dtype=np.int64)
    dataset = TextLanes(tokens, 3, 1, emit_seq_idx=True, eos_id=eos)  # chunk k: inputs tokens[3k:3k+3]
    # chunk 0 starts the epoch; chunk 2 follows the EOS at index 5; the EOS at index 10 is inside chunk 3
    assert [bool(dataset[k]["state_reset"]) for k in range(len(dataset))] == [True, False, True, False, False]
    assert dataset[3]["seq_idx"].tolist() == [0, 0, 1]  # inside a chunk, seq_idx restarts the state
    # without seq_idx resets, a document start is no reason to restart
    assert [bool(TextLanes(tokens, 3, 1)[k]["state_reset"]) for k in range(5)] == [True] + [False] * 4


def test_too_short_a_stream_for_the_lanes_names_the_fix():
    with pytest.raises(DataError, match=r"fewer than one sample of seq_len=16 per lane \(8 lanes"):
        TextLanes(np.arange(100), 16, 8)


def test_a_data_module_that_mixes_in_other_samples_refuses_state_passing(text_dir, tmp_path):
    dm = PasskeyDataModule(source=text_dir, tokenizer="byte", seq_len=256, batch_size=2, val_fraction=0.2,
                           cache_dir=str(tmp_path / "cache"), state_passing=True)
    dm.prepare_data()
    dm.setup("fit")
    with pytest.raises(DataError, match="data.state_passing needs the training batches to be lanes of the text "
                                        "stream, but PasskeyDataModule trains on PasskeyMixDataset samples"):
        dm.train_dataloader()


def test_the_switch_is_documented_for_the_cli():
    parser = ArgumentParser()
    parser.add_class_arguments(TextDataModule, "data")
    help_text = parser.format_help()
    assert "--data.state_passing" in help_text and "Train on contiguous lanes" in help_text
    assert parser.parse_args(["--data.state_passing", "true"]).data.state_passing is True
