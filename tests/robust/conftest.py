"""Tiny end-to-end runs for the robustness tests: a byte-level corpus, a tiny model, a CPU trainer whose
per-step losses land in a CSV file, and a checkpoint after every step."""

import csv
import glob
import os

import pytest
import torch
import yaml

CORPUS_WORDS = "the quick brown fox jumps over the lazy dog and then it rests a while".split()


def write_corpus(folder, n_docs: int = 12, words_per_doc: int = 400) -> str:
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n_docs):
        idx = torch.randint(0, len(CORPUS_WORDS), (words_per_doc,), generator=g).tolist()
        with open(os.path.join(folder, f"doc{i:02d}.txt"), "w") as f:
            f.write(" ".join(CORPUS_WORDS[j] for j in idx) + ".\n")
    return str(folder)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """12 documents of ~2K bytes (one held out): ~20K training tokens, 320 samples of 64 tokens."""
    return write_corpus(tmp_path_factory.mktemp("texts"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    """Token caches shared by a module's runs (they are keyed by what they hold)."""
    return str(tmp_path_factory.mktemp("cache"))


def run_config(folder, corpus: str, cache_dir: str, max_steps: int = 6, seq_len: int = 64, batch_size: int = 4,
               callbacks: list[dict] = (), plugins: list[dict] | None = None) -> str:
    """A config for `lightning-mamba fit`: a checkpoint after every step (save_last) in ``folder/ckpt``, each
    step's train/loss in ``folder/runs/tiny/version_*/metrics.csv``, no validation. Returns its path."""
    folder = str(folder)
    trainer = {
        "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "limit_val_batches": 0, "log_every_n_steps": 1,
        "enable_progress_bar": False, "enable_model_summary": False,
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                   "init_args": {"save_dir": os.path.join(folder, "runs"), "name": "tiny"}},
        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                       "init_args": {"dirpath": os.path.join(folder, "ckpt"), "every_n_train_steps": 1,
                                     "save_last": True}}, *callbacks],
    }
    if plugins:
        trainer["plugins"] = plugins
    config = {
        "seed_everything": 0,
        "trainer": trainer,
        "model": {"d_model": 32, "n_layer": 2, "d_state": 16, "headdim": 16, "chunk_size": 32, "backend": "torch",
                  "warmup_steps": 2},
        "data": {"source": corpus, "tokenizer": "byte", "seq_len": seq_len, "batch_size": batch_size,
                 "cache_dir": cache_dir},
    }
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "run.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def logged_losses(folder, version: str | None = None, metric: str = "train/loss") -> dict[int, float]:
    """step -> ``metric`` from the CSV logs under ``folder/runs`` (all versions, later ones winning, or one)."""
    paths = [os.path.join(version, "metrics.csv")] if version else sorted(
        glob.glob(os.path.join(folder, "runs", "tiny", "version_*", "metrics.csv")),
        key=lambda p: int(p.split("version_")[1].split(os.sep)[0]))
    losses = {}
    for path in paths:
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get(metric):
                    losses[int(row["step"])] = float(row[metric])
    return losses
