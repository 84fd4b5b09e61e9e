"""Exact resume: a run stopped mid-epoch (a crash, or SIGKILL) and resumed from last.ckpt trains on the same
batches and, on CPU, gives bit-identical losses (tolerance 0) to the uninterrupted run."""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lightning_mamba.cli import lightning_cli, main
from lightning_mamba.data.sampler import ResumableSampler

from .conftest import logged_losses, run_config
from .helpers import RecordSteps, SimulatedCrash

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, BATCH = 12, 64  # 320 samples of 64 tokens: 5 batches per epoch, so 12 steps cross two epoch ends


def callback(cls: str, **init_args) -> dict:
    return {"class_path": f"tests.robust.helpers.{cls}", "init_args": init_args}


def latest_losses(folder) -> dict[int, float]:
    """train/loss by step from the newest CSV log only (the resumed run's)."""
    newest = max(glob.glob(os.path.join(folder, "runs", "tiny", "version_*")), key=lambda p: int(p.split("_")[-1]))
    return logged_losses(folder, version=newest)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, cache_dir) -> dict[int, float]:
    """The uninterrupted run's loss at each step, with the thread count the resumed runs use (a CPU reduction splits
    by thread count, so another count may change the last bit)."""
    assert torch.get_num_threads() == 1, "the reference must run with the tests' single thread (tests/conftest.py)"
    folder = tmp_path_factory.mktemp("reference")
    main(["fit", "--config", run_config(folder, corpus, cache_dir, STEPS, batch_size=BATCH)])
    losses = logged_losses(folder)
    assert sorted(losses) == list(range(STEPS))
    return losses


@pytest.mark.parametrize("num_workers", [0, 2])
def test_checkpointed_position_is_what_was_trained_on(tmp_path, corpus, cache_dir, num_workers):
    """At every step (across an epoch end, with DataLoader workers running ahead, validation in between), the state
    of the data module counts exactly the samples trained on: a sampler loaded with it yields what came next."""
    cfg = run_config(tmp_path, corpus, cache_dir, 8, batch_size=BATCH, callbacks=[callback("RecordSteps")])
    cli = lightning_cli(["fit", "--config", cfg, "--data.num_workers", str(num_workers),
                         "--trainer.limit_val_batches", "2", "--trainer.val_check_interval", "3"])
    record = next(c for c in cli.trainer.callbacks if isinstance(c, RecordSteps))
    dataset = cli.trainer.train_dataloader.dataset
    per_epoch = len(dataset) // BATCH
    assert per_epoch == 5 and len(record.batches) == 8
    for step, state in enumerate(record.states):
        epoch, done = divmod(step + 1, per_epoch)
        if done == 0:  # saved on the last batch of an epoch: all of it consumed
            epoch, done = epoch - 1, per_epoch
        assert state["train_sampler"] == {"epoch": epoch, "consumed": done * BATCH, "num_samples": len(dataset),
                                          "seed": 0}
        sampler = ResumableSampler(len(dataset), seed=0)
        sampler.load_state_dict(state["train_sampler"])
        upcoming = list(sampler)[:BATCH * (per_epoch - done)]
        later = record.batches[step + 1:step + 1 + per_epoch - done]
        expected = [torch.stack([dataset[i]["input_ids"] for i in upcoming[b * BATCH:(b + 1) * BATCH]])
                    for b in range(len(later))]
        assert all(torch.equal(a, b) for a, b in zip(later, expected))


@pytest.mark.parametrize("crash_at", [3, 5, 7])  # mid epoch 0, the end of epoch 0, mid epoch 1
def test_resume_after_a_crash_gives_identical_losses(tmp_path, corpus, cache_dir, reference, crash_at):
    cfg = run_config(tmp_path, corpus, cache_dir, STEPS, batch_size=BATCH,
                     callbacks=[callback("CrashAt", step=crash_at)])
    with pytest.raises(SimulatedCrash):
        main(["fit", "--config", cfg])
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == crash_at
    main(["fit", "--config", run_config(tmp_path, corpus, cache_dir, STEPS, batch_size=BATCH),
          "--ckpt_path", str(last)])
    resumed = latest_losses(tmp_path)
    assert sorted(resumed) == list(range(crash_at, STEPS))
    assert resumed == {s: reference[s] for s in resumed}  # exact, no tolerance


def test_resume_after_sigkill_gives_identical_losses(tmp_path, corpus, cache_dir, reference):
    """The real thing: `lightning-mamba fit` in a subprocess, killed with SIGKILL mid-epoch, resumed."""
    kill_after = 6  # epoch 1, batch 1
    cfg = run_config(tmp_path, corpus, cache_dir, STEPS, batch_size=BATCH,
                     callbacks=[callback("SlowSteps", seconds=0.3)])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the in-process runs: same reductions, same bits
    proc = subprocess.Popen([sys.executable, "-m", "lightning_mamba.cli", "fit", "--config", cfg], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        # the file of step k + 1 exists only after last.ckpt of step k was written
        while not any(int(p.rsplit("step=", 1)[1][:-5]) > kill_after
                      for p in glob.glob(str(tmp_path / "ckpt" / "epoch=*-step=*.ckpt"))):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the run did not reach the step"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    stopped_at = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"]
    assert kill_after <= stopped_at < STEPS  # killed mid-run, after an epoch end
    main(["fit", "--config", run_config(tmp_path, corpus, cache_dir, STEPS, batch_size=BATCH),
          "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")])
    resumed = latest_losses(tmp_path)
    assert sorted(resumed) == list(range(stopped_at, STEPS))
    assert resumed == {s: reference[s] for s in resumed}  # exact, no tolerance
