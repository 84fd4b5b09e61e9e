"""Exact resume from any last.ckpt, also the one a run writes when it stops at max_steps mid-epoch: a run extended
with a larger max_steps (twice) trains on the batches of the uninterrupted run and gives bit-identical losses, and
the throughput totals (train/batches, train/samples, train/time) keep counting across the resumes."""

import glob
import os

import pytest
import torch
import yaml

from lightning_mamba.cli import main

from .conftest import logged_losses, run_config

STEPS, BATCH = 12, 64  # 320 samples of 64 tokens: 5 batches per epoch


def config(folder, corpus, cache_dir, max_steps: int, every: int) -> str:
    """The robust tests' run with a checkpoint every ``every`` steps, a learning rate that does not depend on
    max_steps (the default WSD decays over the last 10% of the steps: a shorter run has another schedule) and the
    throughput monitor."""
    path = run_config(folder, corpus, cache_dir, max_steps, batch_size=BATCH,
                      callbacks=[{"class_path": "lightning_mamba.callbacks.TokenThroughputMonitor"}])
    with open(path) as f:
        cfg = yaml.safe_load(f)
    cfg["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = every
    cfg["model"]["schedule"] = "constant"
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, cache_dir) -> dict[int, float]:
    assert torch.get_num_threads() == 1, "the reference must run with the tests' single thread (tests/conftest.py)"
    folder = tmp_path_factory.mktemp("reference")
    main(["fit", "--config", config(folder, corpus, cache_dir, STEPS, every=4)])
    losses = logged_losses(folder)
    assert sorted(losses) == list(range(STEPS))
    return losses


@pytest.mark.parametrize("every,stops", [
    (4, (4, 7)),  # the resumed run writes its own last.ckpt at max_steps 7, mid-epoch 1
    (4, (3, 8)),  # the first run's end-of-fit last.ckpt (step 3), then a checkpoint mid-way through the shifted epochs
    (100, (3, 6)),  # two end-of-fit last.ckpt in a row, each mid-epoch
])
def test_extending_max_steps_twice_gives_the_uninterrupted_losses(tmp_path, corpus, cache_dir, reference, every,
                                                                  stops):
    last = str(tmp_path / "ckpt" / "last.ckpt")
    main(["fit", "--config", config(tmp_path, corpus, cache_dir, stops[0], every)])
    for max_steps in (*stops[1:], STEPS):
        saved = torch.load(last, weights_only=False)
        assert saved["global_step"] <= max_steps
        main(["fit", "--config", config(tmp_path, corpus, cache_dir, max_steps, every), "--ckpt_path", last])
    losses = logged_losses(tmp_path)  # later runs win where a step was trained twice (after the last checkpoint)
    assert sorted(losses) == list(range(STEPS))
    assert losses == reference  # exact, no tolerance


def test_end_of_fit_checkpoint_resumes_the_rest_of_its_epoch(tmp_path, corpus, cache_dir):
    """What the end-of-fit last.ckpt says: Lightning counts the epoch as done, the data position continues it."""
    main(["fit", "--config", config(tmp_path, corpus, cache_dir, 3, every=100)])
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 1
    assert saved["TextDataModule"]["train_sampler"] == {"epoch": 0, "consumed": 3 * BATCH, "num_samples": 321,
                                                        "seed": 0, "epoch_offset": 1}


def test_throughput_totals_keep_counting_after_a_resume(tmp_path, corpus, cache_dir):
    main(["fit", "--config", config(tmp_path, corpus, cache_dir, 4, every=4)])
    main(["fit", "--config", config(tmp_path, corpus, cache_dir, 8, every=4),
          "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")])
    first, second = sorted(glob.glob(os.path.join(tmp_path, "runs", "tiny", "version_*")),
                           key=lambda p: int(p.rsplit("_", 1)[1]))
    batches = {**logged_losses(tmp_path, first, "train/batches"), **logged_losses(tmp_path, second, "train/batches")}
    samples = logged_losses(tmp_path, second, "train/samples")
    times = {**logged_losses(tmp_path, first, "train/time"), **logged_losses(tmp_path, second, "train/time")}
    assert batches == {s: s + 1 for s in range(8)}  # the row of step s counts s + 1 batches
    assert samples == {s: (s + 1) * BATCH for s in range(4, 8)}
    assert all(times[s] < times[s + 1] for s in range(7))  # the clock goes on
