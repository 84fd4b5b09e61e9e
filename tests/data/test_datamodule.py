import os
import re
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser

from lightning_mamba.data import ByteTokenizer, DataError, TextDataModule


def make(text_dir, tmp_path, **kw) -> TextDataModule:
    settings = dict(source=text_dir, tokenizer="byte", seq_len=64, batch_size=4, val_fraction=0.2,
                    cache_dir=str(tmp_path / "cache"))
    return TextDataModule(**{**settings, **kw})


def ready(dm: TextDataModule) -> TextDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def cache_files(dm) -> list[str]:
    return sorted(f for f in os.listdir(dm.hparams.cache_dir) if f.startswith("tokens-"))


def test_byte_end_to_end(text_dir, tmp_path, sample_documents):
    dm = ready(make(text_dir, tmp_path))
    assert dm.vocab_size_for_model == 257 and dm.eos_id == 256
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 64)
    assert batch["input_ids"].dtype == torch.long and "seq_idx" not in batch
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    val = next(iter(dm.val_dataloader()))
    assert val["input_ids"].shape[1] == 64
    # the two streams are the documents of each side, EOS-joined: together, all documents, once each
    train, held_out = dm.train_tokens(), dm.val_tokens()
    assert train[-1] == held_out[-1] == 256
    assert (train == 256).sum() + (held_out == 256).sum() == len(sample_documents)
    train_docs = set(ByteTokenizer().decode(train).split("<|endoftext|>"))
    val_docs = set(ByteTokenizer().decode(held_out).split("<|endoftext|>"))
    assert (train_docs - {""}).isdisjoint(val_docs - {""})
    assert (train_docs | val_docs) - {""} == set(sample_documents)


def test_bpe_end_to_end_and_cache_reuse(text_dir, tmp_path, capsys):
    dm = make(text_dir, tmp_path, tokenizer="bpe", bpe_vocab_size=600, reset_at_document_boundaries=True)
    assert dm.vocab_size_for_model == 600
    assert not os.path.exists(dm.hparams.cache_dir)  # known without training or tokenizing anything
    ready(dm)
    err = capsys.readouterr().err  # the slow phases say when they start and end, with the time taken
    assert "data: training a BPE tokenizer of 600 tokens on the training split ..." in err
    assert re.search(r"data: training a BPE tokenizer of 600 tokens on the training split: done in [0-9.]+ s", err)
    assert re.search(r"data: tokenizing the train split into .*: done in [0-9.]+ s", err)
    assert dm.tokenizer.vocab_size <= 600
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].max() < 600 and batch["seq_idx"].dtype == torch.int32
    assert dm.train_tokens().dtype == np.uint16
    files = cache_files(dm)
    stamps = {f: os.stat(os.path.join(dm.hparams.cache_dir, f)).st_mtime_ns for f in files}

    again = ready(make(text_dir, tmp_path, tokenizer="bpe", bpe_vocab_size=600, seq_len=32, batch_size=2))
    assert again._documents is None  # nothing was loaded: tokenizer and caches came from disk
    assert cache_files(again) == files  # seq_len and batch_size do not key the caches
    assert {f: os.stat(os.path.join(dm.hparams.cache_dir, f)).st_mtime_ns for f in files} == stamps
    np.testing.assert_array_equal(again.val_tokens(), dm.val_tokens())
    assert "data:" not in capsys.readouterr().err  # nothing to do, nothing said


def test_a_bpe_smaller_than_asked_for_says_so(tmp_path):
    """A corpus too small for bpe_vocab_size: the model (sized before the BPE is trained) has rows no token uses."""
    corpus = tmp_path / "small"
    corpus.mkdir()
    for d in range(4):
        (corpus / f"doc{d}.txt").write_text(f"document {d}: the cat sat on the mat.\n")
    dm = make(str(corpus), tmp_path, tokenizer="bpe", bpe_vocab_size=5000, seq_len=8, batch_size=1, val_fraction=0.25)
    assert dm.vocab_size_for_model == 5000
    with pytest.warns(UserWarning, match=r"data.bpe_vocab_size=5000, but the corpus gives the BPE only (\d+) tokens.*"
                                         r"set data.bpe_vocab_size \1$"):
        ready(dm)
    assert dm.tokenizer.vocab_size < 5000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a BPE of the size asked for: nothing to say
        ready(make(str(corpus), tmp_path, tokenizer="bpe", bpe_vocab_size=dm.tokenizer.vocab_size, seq_len=8,
                   batch_size=1, val_fraction=0.25))


def test_settings_that_change_tokens_change_the_cache(text_dir, tmp_path):
    base = make(text_dir, tmp_path)
    assert make(text_dir, tmp_path, seq_len=128, batch_size=1).stream_key == base.stream_key
    for change in ({"tokenizer": "bpe", "bpe_vocab_size": 300}, {"seed": 1}, {"val_fraction": 0.3}):
        assert make(text_dir, tmp_path, **change).stream_key != base.stream_key, change
    with open(os.path.join(text_dir, "part1", "doc00.txt"), "a") as f:
        f.write("An edit.\n")
    assert make(text_dir, tmp_path).stream_key != base.stream_key  # a changed file changes the source


@pytest.mark.parametrize("cache", ["corpus", "corpus/cache"], ids=["the-source-folder", "inside-the-source"])
def test_a_cache_dir_in_the_source_folder_is_not_read_as_text(text_dir, tmp_path, sample_documents, cache):
    """Texts kept in data/ itself (the default cache_dir) or a source folder holding the cache folder: the second run
    must neither read the first one's caches, tokenizer and Arrow copy as documents (json files without a text
    field: an error) nor see a changed source (a rebuild every run)."""
    options = dict(tokenizer="bpe", bpe_vocab_size=300, cache_dir=str(tmp_path / cache))
    first = ready(make(text_dir, tmp_path, **options))
    assert {"hf_datasets"} <= set(os.listdir(first.hparams.cache_dir)) and cache_files(first)
    again = make(text_dir, tmp_path, **options)
    assert again.stream_key == first.stream_key
    ready(again)
    assert again._documents is None  # the caches were reused, nothing was loaded
    np.testing.assert_array_equal(again.train_tokens(), first.train_tokens())
    (tmp_path / cache / "notes.txt").write_text("The user's own text beside the caches is a document.\n")
    assert make(text_dir, tmp_path, **options).stream_key != first.stream_key


def test_damaged_cache_is_rebuilt(text_dir, tmp_path):
    dm = ready(make(text_dir, tmp_path))
    expected = np.array(dm.train_tokens())
    path = dm.cache_path("train")
    os.truncate(path, os.path.getsize(path) // 2)
    again = ready(make(text_dir, tmp_path))
    np.testing.assert_array_equal(again.train_tokens(), expected)


def test_val_max_tokens_caps_validation_only(text_dir, tmp_path):
    dm = ready(make(text_dir, tmp_path, val_max_tokens=200))
    assert len(dm.val_dataloader().dataset) == (200 - 1) // 64
    assert len(dm.val_tokens()) > 200  # the evaluation stream stays whole


def test_a_home_relative_cache_dir_and_tokenizer_are_expanded(text_dir, tmp_path, monkeypatch):
    """``cache_dir: ~/cache`` in a config file (no shell expands it) went to a folder named "~" in the working directory,
    the Arrow copy of the local files to the home folder; ``tokenizer: ~/tok.json`` was said not to exist."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    ByteTokenizer().save(str(home / "tok.json"))
    dm = ready(make(text_dir, tmp_path, cache_dir="~/cache", tokenizer="~/tok.json"))
    assert dm.hparams.cache_dir == str(home / "cache")
    assert cache_files(dm) and "hf_datasets" in os.listdir(home / "cache")
    assert not (tmp_path / "~").exists()
    assert dm.tokenizer.vocab_size == 257


def test_tokenizer_object_is_accepted(text_dir, tmp_path):
    dm = ready(make(text_dir, tmp_path, tokenizer=ByteTokenizer()))
    assert dm.hparams.tokenizer == "byte" and dm.vocab_size_for_model == 257


@pytest.mark.parametrize("settings, message", [
    ({"seq_len": 1}, r"data\.seq_len must be >= 2 \(got 1\)"),
    ({"batch_size": 0}, r"data\.batch_size must be >= 1 \(got 0\)"),
    ({"val_fraction": 1.0}, r"data\.val_fraction must be between 0 and 1"),
    ({"tokenizer": "gpt2"}, r"unknown tokenizer 'gpt2': use 'byte', 'bpe' or a path to a tokenizer\.json file"),
    ({"tokenizer": "bpe", "bpe_vocab_size": 100}, r"data\.bpe_vocab_size must be >= 257"),
    ({"val_max_tokens": 10}, r"data\.val_max_tokens=10 holds no sample of seq_len=64"),
])
def test_bad_settings_fail_at_construction(text_dir, tmp_path, settings, message):
    with pytest.raises(DataError, match=message):
        make(text_dir, tmp_path, **settings)


def test_seq_len_larger_than_the_corpus_names_the_fix(text_dir, tmp_path):
    dm = ready(make(text_dir, tmp_path, seq_len=10_000_000))
    with pytest.raises(DataError, match=r"data\.seq_len=10000000 is larger than the training split \(\d+ tokens\): "
                                        r"use a smaller seq_len or a larger corpus"):
        dm.train_dataloader()
    with pytest.raises(DataError, match="larger than the validation split"):
        dm.val_dataloader()


def test_too_few_documents(tmp_path):
    (tmp_path / "one.txt").write_text("a single document")
    with pytest.raises(DataError, match="needs at least 2"):
        ready(make(str(tmp_path / "one.txt"), tmp_path))


def test_training_order_is_seeded(text_dir, tmp_path):
    first = [b["input_ids"] for b in ready(make(text_dir, tmp_path)).train_dataloader()]
    second = [b["input_ids"] for b in ready(make(text_dir, tmp_path)).train_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_batches_are_pinned_only_for_a_trainer_on_a_gpu(text_dir, tmp_path):
    """Lightning copies a batch to the GPU with non_blocking=True: asynchronous from pinned memory only."""
    dm = make(text_dir, tmp_path)
    assert dm.loader_options()["pin_memory"] is False  # no trainer (the analysis' own loaders)
    for device, pinned in (("cpu", False), ("cuda", True)):
        dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
        assert dm.loader_options()["pin_memory"] is pinned


def test_every_setting_is_documented_for_the_cli():
    parser = ArgumentParser()
    parser.add_class_arguments(TextDataModule, "data")
    help_text = parser.format_help()
    for name in ("source", "tokenizer", "bpe_vocab_size", "seq_len", "batch_size", "val_fraction", "val_max_tokens",
                 "reset_at_document_boundaries", "num_workers", "cache_dir", "seed", "text_field"):
        assert f"--data.{name}" in help_text
    assert "Training length in tokens" in help_text and "held out for validation" in help_text
    cfg = parser.parse_args(["--data.seq_len", "256", "--data.val_max_tokens", "null"])
    assert cfg.data.seq_len == 256 and cfg.data.val_max_tokens is None and cfg.data.tokenizer == "bpe"
