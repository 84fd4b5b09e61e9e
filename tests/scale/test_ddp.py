"""Data-parallel training with Lightning's own DDP: a real 2-process run on CPU (gloo), started the way a user
starts one (`python -m lightning_mamba.cli fit ... --trainer configs/trainer/ddp_cpu.yaml`; Lightning launches
the second process by re-running the command), checked against one process trained on the global batch; and
the data sharding over a whole epoch, checked on the data module's own DataLoaders for several world sizes."""

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from lightning_mamba.data import TextDataModule
from tests.robust.conftest import write_corpus
from tests.scale.helpers import ROOT, fit_at_once, write_config

DDP_CPU = os.path.join(ROOT, "configs", "trainer", "ddp_cpu.yaml")
PER_RANK_BATCH, STEPS = 4, 4

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run twice: DDP on 2 processes with PER_RANK_BATCH samples each, and 1 process with 2 x as many."""
    tmp = tmp_path_factory.mktemp("ddp")
    corpus = write_corpus(tmp / "texts")
    # a token cache each: the two runs go at once, and the DDP run builds its own (rank 0's prepare_data)
    one = write_config(str(tmp / "one.yaml"), corpus, str(tmp / "cache_one"), str(tmp / "one"), 2 * PER_RANK_BATCH,
                       STEPS)
    ddp = write_config(str(tmp / "ddp.yaml"), corpus, str(tmp / "cache_ddp"), str(tmp / "ddp"), PER_RANK_BATCH, STEPS)
    fit_at_once(["--config", one], ["--config", ddp, "--trainer", DDP_CPU])
    return {"one": torch.load(tmp / "one" / "rank0.pt"),
            "ranks": [torch.load(tmp / "ddp" / f"rank{r}.pt") for r in range(2)]}


def rows(batch: torch.Tensor) -> list[tuple]:
    return sorted(map(tuple, batch.tolist()))


@needs_gloo
def test_each_step_the_ranks_train_on_disjoint_halves_of_the_global_batch(runs):
    one, ranks = runs["one"], runs["ranks"]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    assert one["step"] == STEPS and all(r["step"] == STEPS for r in ranks)
    for k in range(STEPS):
        a, b = (r["batches"][k] for r in ranks)
        assert a.shape[0] == b.shape[0] == PER_RANK_BATCH
        assert not set(rows(a)) & set(rows(b))
        assert rows(torch.cat([a, b])) == rows(one["batches"][k])  # together: the one process's batch


@needs_gloo
def test_gradients_agree_across_ranks_and_equal_the_global_batch_gradient(runs):
    one, ranks = runs["one"], runs["ranks"]
    for k in range(STEPS):
        g0, g1, g = ranks[0]["grads"][k], ranks[1]["grads"][k], one["grads"][k]
        assert torch.equal(g0, g1)  # after DDP's all-reduce: bit for bit
        # mean of the two ranks' mean losses == the mean over the global batch (equal-size halves)
        assert (g0 - g).abs().max() <= 1e-5 * g.abs().max(), f"step {k}"


@needs_gloo
def test_weights_equal_one_process_training_on_the_global_batch(runs):
    one, ranks = runs["one"], runs["ranks"]
    for name in one["params"]:
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
        assert torch.equal(ranks[0]["initial"][name], one["initial"][name]), name  # same seed, same start
    diff = max((ranks[0]["params"][n] - p).abs().max().item() for n, p in one["params"].items())
    moved = max((p - one["initial"][n]).abs().max().item() for n, p in one["params"].items())
    # fp32 all-reduce vs one mean differ by rounding (~1e-8 typically), which AdamW can blow up where a gradient
    # is near 0 (seen: up to 1e-5), still far below how far the weights moved (~5e-3)
    assert diff < 5e-5 < moved / 50, (diff, moved)


# ---- sharding over a whole epoch (no processes: the data module's loaders for each rank) ----------------
@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shard")
    return write_corpus(tmp / "texts"), str(tmp / "cache")


def epoch_batches(data_dirs, seq_len: int, batch_size: int, world_size: int, rank: int, epoch: int):
    """The sample indices of each step of ``epoch`` on ``rank``, as the DataLoader of the run would batch them."""
    corpus, cache = data_dirs
    dm = TextDataModule(source=corpus, tokenizer="byte", seq_len=seq_len, batch_size=batch_size, cache_dir=cache)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(world_size=world_size, global_rank=rank)  # what train_loader reads
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)  # as Lightning does at each epoch start
    return [list(b) for b in loader.batch_sampler], len(loader.dataset), len(dm.train_tokens())


@pytest.mark.parametrize("world_size,batch_size,seq_len", [(2, 4, 64), (2, 3, 50), (3, 5, 64), (4, 2, 37)])
def test_one_epoch_over_the_ranks_sees_every_sample_and_token_once(data_dirs, world_size, batch_size, seq_len):
    for epoch in (0, 1):
        per_rank = [epoch_batches(data_dirs, seq_len, batch_size, world_size, r, epoch) for r in range(world_size)]
        single, n, n_tokens = epoch_batches(data_dirs, seq_len, world_size * batch_size, 1, 0, epoch)
        steps = len(per_rank[0][0])
        assert all(len(b) == steps for b, _, _ in per_rank) and steps == len(single)  # ranks stay in step
        seen = [i for b, _, _ in per_rank for batch in b for i in batch]
        assert len(seen) == len(set(seen)), "a sample twice in one epoch"
        # the samples not seen are fewer than one global batch: the same as one process on the global batch
        assert len(seen) == n - n % (world_size * batch_size)
        for k in range(steps):  # step k of all ranks together == step k of one process on the global batch
            assert sorted(i for b, _, _ in per_rank for i in b[k]) == sorted(single[k])
        # sample i is tokens [i L, i L + L] (inputs i L .. i L + L - 1): every token is an input at most once
        counts = np.zeros(n_tokens, dtype=int)
        for i in seen:
            counts[i * seq_len:(i + 1) * seq_len] += 1
        assert counts.max() == 1 and counts.sum() == len(seen) * seq_len
        assert n_tokens - counts.sum() < (world_size * batch_size + 1) * seq_len + 1
