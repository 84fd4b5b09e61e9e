"""A crash while a checkpoint is written leaves the previous one whole and loadable."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lightning_mamba.cli import main
from lightning_mamba.training.checkpoint_io import AtomicCheckpointIO

from .conftest import run_config

ATOMIC = [{"class_path": "lightning_mamba.training.checkpoint_io.AtomicCheckpointIO"}]


@pytest.mark.parametrize("plugins", [None, ATOMIC], ids=["lightning-default", "AtomicCheckpointIO"])
def test_failed_save_keeps_the_previous_last_ckpt(tmp_path, corpus, cache_dir, plugins):
    callbacks = [{"class_path": "tests.robust.helpers.FailingSave", "init_args": {"step": 3}}]
    cfg = run_config(tmp_path, corpus, cache_dir, 5, callbacks=callbacks, plugins=plugins)
    with pytest.raises(OSError, match="disk full"):
        main(["fit", "--config", cfg])
    ckpt = tmp_path / "ckpt"
    assert sorted(os.listdir(ckpt)) == ["epoch=0-step=2.ckpt", "last.ckpt"]  # no half-written or temporary file
    assert torch.load(ckpt / "last.ckpt", weights_only=False)["global_step"] == 2
    # and the run resumes from it
    main(["fit", "--config", run_config(tmp_path, corpus, cache_dir, 5, plugins=plugins),
          "--ckpt_path", str(ckpt / "last.ckpt")])
    assert torch.load(ckpt / "last.ckpt", weights_only=False)["global_step"] == 5


SAVE_LOOP = """
import sys, torch
from lightning_mamba.training.checkpoint_io import AtomicCheckpointIO
io, step = AtomicCheckpointIO(), 0
while True:
    step += 1
    io.save_checkpoint({"step": step, "w": torch.full((4_000_000,), float(step))}, sys.argv[1])
    print(step, flush=True)
"""


def test_sigkill_during_saves_leaves_a_whole_checkpoint(tmp_path):
    """Kill a process that does nothing but save 16 MB checkpoints: the file is always a whole one, and the
    next save removes the temporary file the killed one left."""
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(path)], stdout=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for _ in range(3):
            assert proc.stdout.readline(), "the save loop died"
        time.sleep(0.05)  # somewhere inside the next save
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    saved = torch.load(path, weights_only=True)
    assert saved["step"] >= 3 and bool((saved["w"] == saved["step"]).all())
    AtomicCheckpointIO().save_checkpoint({"step": 0}, path)
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_plugin_is_wired_through_the_trainer_config(tmp_path, corpus, cache_dir):
    from lightning_mamba.cli import lightning_cli

    cli = lightning_cli(["--config", run_config(tmp_path, corpus, cache_dir, 1, plugins=ATOMIC)], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
