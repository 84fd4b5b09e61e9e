"""ResumableSampler: the order depends on (seed, epoch) only, and a loaded state yields exactly the rest."""

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lightning_mamba.data.sampler import ResumableSampler


def test_order_is_a_seeded_permutation_per_epoch():
    s = ResumableSampler(50, seed=3)
    first = list(s)
    assert sorted(first) == list(range(50)) and len(s) == 50
    assert list(ResumableSampler(50, seed=3)) == first  # any process recomputes it
    assert list(ResumableSampler(50, seed=4)) != first
    s.set_epoch(1)
    assert list(s) != first and sorted(s) == list(range(50))


@pytest.mark.parametrize("consumed", [0, 8, 24, 48])
def test_loaded_state_yields_exactly_the_rest_of_the_epoch(consumed):
    full = ResumableSampler(50, seed=0)
    full.set_epoch(2)
    order = list(full)
    resumed = ResumableSampler(50, seed=0)
    resumed.load_state_dict({"epoch": 2, "consumed": consumed, "num_samples": 50, "seed": 0})
    assert list(resumed) == order[consumed:]
    assert len(resumed) == 50  # a whole epoch: Lightning counts the batches already done
    resumed.set_epoch(2)  # Lightning sets the resumed epoch again: the position stays
    assert list(resumed) == order[consumed:]
    resumed.set_epoch(3)  # a new epoch starts from its first sample
    assert resumed.consumed == 0 and sorted(resumed) == list(range(50))


def test_ranks_share_the_order_and_consumed_counts_all_ranks():
    order = list(ResumableSampler(10, seed=1))[:10]
    ranks = [ResumableSampler(10, seed=1, num_replicas=3, rank=r) for r in range(3)]
    assert all(isinstance(r, DistributedSampler) for r in ranks)  # so Lightning does not wrap it again
    assert [list(r) for r in ranks] == [order[0:9:3], order[1:9:3], order[2:9:3]]  # 3 each, the tail left out
    for r in ranks:
        r.advance(2)  # one batch of 2 on every rank
    assert [r.state_dict()["consumed"] for r in ranks] == [6, 6, 6]
    assert [list(r) for r in ranks] == [[order[6]], [order[7]], [order[8]]]


def test_a_different_data_set_restarts_the_epoch_with_a_warning():
    s = ResumableSampler(40, seed=0)
    with pytest.warns(UserWarning, match="the training data changed since the checkpoint"):
        s.load_state_dict({"epoch": 1, "consumed": 16, "num_samples": 50, "seed": 0})
    assert s.epoch == 1 and s.consumed == 0 and len(list(s)) == 40


def test_dataloader_batches_follow_the_sampler():
    s = ResumableSampler(20, seed=0)
    s.load_state_dict({"epoch": 0, "consumed": 8, "num_samples": 20, "seed": 0})
    batches = list(DataLoader(list(range(20)), batch_size=4, sampler=s, drop_last=True))
    assert torch.cat(batches).tolist() == list(ResumableSampler(20, seed=0))[8:20]
