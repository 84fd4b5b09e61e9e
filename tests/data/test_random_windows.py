"""data.sampling random_windows: windows at fresh uniform offsets every step, seeded, resumable mid-epoch."""

import numpy as np
import pytest
import torch

from lightning_mamba.data import DataError, PasskeyDataModule, RandomWindowSampler, TextDataModule

SEQ, BATCH = 32, 4


def make(text_dir, tmp_path, **kw) -> TextDataModule:
    settings = dict(source=text_dir, tokenizer="byte", seq_len=SEQ, batch_size=BATCH, val_fraction=0.2,
                    cache_dir=str(tmp_path / "cache"), sampling="random_windows")
    dm = TextDataModule(**{**settings, **kw})
    dm.setup("fit")
    return dm


def offsets_of(batch, tokens: np.ndarray, candidates: np.ndarray) -> list[int]:
    """The stream offset of each row of ``batch`` (checked against the tokens, not taken from the sampler)."""
    out = []
    for row, labels in zip(batch["input_ids"], batch["labels"]):
        o = int(candidates[len(out)])
        assert torch.equal(row, torch.from_numpy(tokens[o:o + SEQ].astype(np.int64)))
        assert torch.equal(labels, torch.from_numpy(tokens[o + 1:o + SEQ + 1].astype(np.int64)))
        out.append(o)
    return out


def test_windows_start_anywhere_are_fresh_every_step_and_in_range(text_dir, tmp_path):
    dm = make(text_dir, tmp_path)
    tokens = np.asarray(dm.train_tokens())
    loader = dm.train_dataloader()
    assert len(loader) == (len(tokens) // SEQ) // BATCH  # default epoch: as many samples as there are blocks
    sampler = dm._sampler
    assert isinstance(sampler, RandomWindowSampler) and sampler.num_offsets == len(tokens) - SEQ
    drawn = sampler.order(0)
    batches = list(loader)
    seen = [offsets_of(b, tokens, drawn[i * BATCH:(i + 1) * BATCH]) for i, b in enumerate(batches)]
    flat = np.array(seen).ravel()
    assert flat.min() >= 0 and flat.max() + SEQ + 1 <= len(tokens)  # every window lies in the stream
    assert all(a != b for a, b in zip(seen, seen[1:]))  # new offsets at every step
    assert len(set(flat.tolist())) > 0.95 * len(flat)  # (almost) no window twice
    assert (flat % SEQ != 0).mean() > 0.9  # not the fixed blocks
    sampler.set_epoch(1)
    assert not np.array_equal(sampler.order(1), drawn)  # a new epoch draws new windows


def test_offsets_are_uniform_over_the_stream():
    s = RandomWindowSampler(1000, 50_000, seed=0)
    offsets = np.array(list(s))
    assert offsets.min() >= 0 and offsets.max() < 1000
    counts = np.bincount(offsets // 100, minlength=10)
    assert np.all(np.abs(counts - 5000) < 300), counts  # ~4.2 sigma per bin
    assert offsets.min() == 0 and offsets.max() == 999  # both ends are reachable


def test_the_windows_depend_on_the_seed_only(text_dir, tmp_path):
    first = [b["input_ids"] for b in make(text_dir, tmp_path).train_dataloader()]
    again = [b["input_ids"] for b in make(text_dir, tmp_path).train_dataloader()]
    other = [b["input_ids"] for b in make(text_dir, tmp_path, seed=1).train_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and len(first) == len(again)
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("done", [1, 5])
def test_a_resumed_run_draws_exactly_the_windows_of_the_uninterrupted_one(text_dir, tmp_path, done):
    full = make(text_dir, tmp_path, windows_per_epoch=40)
    full.train_dataloader()
    full._sampler.set_epoch(2)  # mid-way through a later epoch
    batches = []
    for batch in full.train_dataloader():
        batches.append(batch["input_ids"])
        if len(batches) == done:
            full._sampler.advance(BATCH * done)  # what on_before_batch_transfer counts, batch by batch
            state = full.state_dict()
    assert len(batches) == 10 and state["train_sampler"]["consumed"] == BATCH * done
    assert state["train_sampler"]["epoch"] == 2 and state["train_sampler"]["kind"] == "random_windows"

    resumed = make(text_dir, tmp_path, windows_per_epoch=40)
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    assert len(loader) == 10  # a whole epoch: Lightning counts the batches already done
    rest = [b["input_ids"] for b in loader]
    assert len(rest) == 10 - done and all(torch.equal(a, b) for a, b in zip(rest, batches[done:]))


def test_a_checkpoint_of_other_data_restarts_the_epoch(text_dir, tmp_path):
    dm = make(text_dir, tmp_path)
    same_size = len(dm.train_tokens()) // SEQ  # the blocks' count: the windows' default epoch is as long
    dm.load_state_dict({"train_sampler": {"epoch": 1, "consumed": 8, "num_samples": same_size, "seed": 0}})
    with pytest.warns(UserWarning, match="the training data changed since the checkpoint"):
        dm.train_dataloader()
    assert (dm._sampler.epoch, dm._sampler.consumed) == (1, 0)


def test_validation_is_the_held_out_blocks_as_with_fixed_blocks(text_dir, tmp_path):
    windows = make(text_dir, tmp_path)
    blocks = make(text_dir, tmp_path, sampling="blocks")
    a, b = list(windows.val_dataloader()), list(blocks.val_dataloader())
    assert len(a) == len(b) and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))


@pytest.mark.parametrize("settings,fragment", [
    (dict(sampling="shuffled"), "data.sampling='shuffled' is unknown"),
    (dict(sampling="blocks", windows_per_epoch=10), "needs data.sampling random_windows"),
    (dict(windows_per_epoch=0), "data.windows_per_epoch=0"),
    (dict(state_passing=True), "exclude each other"),
])
def test_bad_settings_are_one_clear_line(text_dir, tmp_path, settings, fragment):
    with pytest.raises(DataError) as e:
        make(text_dir, tmp_path, **settings)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_too_short_an_epoch_and_wrapped_datasets_are_refused(text_dir, tmp_path):
    with pytest.raises(DataError, match="data.windows_per_epoch=3 is less than one batch"):
        make(text_dir, tmp_path, windows_per_epoch=3).train_dataloader()
    passkey = PasskeyDataModule(source=text_dir, tokenizer="byte", seq_len=256, batch_size=BATCH, val_fraction=0.2,
                                cache_dir=str(tmp_path / "cache"), sampling="random_windows")
    passkey.setup("fit")
    with pytest.raises(DataError, match="PasskeyMixDataset samples: set data.sampling blocks"):
        passkey.train_dataloader()
