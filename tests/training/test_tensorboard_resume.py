"""A run killed past its last checkpoint and resumed into the same run directory: TensorBoard shows each step once
(the interrupted run's steps past the checkpoint hidden by a session start at the checkpoint's step + 1), and the
checkpoint's own step keeps the interrupted run's points."""

import os

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_mamba.cli import main

from ..robust.conftest import run_config, write_corpus
from ..robust.helpers import SimulatedCrash


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_corpus(tmp_path_factory.mktemp("texts"))


def tensorboard_config(folder, corpus, cache_dir, crash_at=None) -> str:
    """The robustness tests' tiny run, logging to TensorBoard, a checkpoint every 3 steps in the run directory (so a
    resume goes on there), optionally crashing when step ``crash_at`` would start."""
    callbacks = [] if crash_at is None else [{"class_path": "tests.robust.helpers.CrashAt",
                                              "init_args": {"step": crash_at}}]
    path = run_config(folder, corpus, cache_dir, 8, batch_size=4, callbacks=callbacks)
    config = yaml.safe_load(open(path))
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                   "init_args": {"save_dir": os.path.join(str(folder), "runs"), "name": "tiny"}}
    checkpoint = config["trainer"]["callbacks"][0]["init_args"]
    del checkpoint["dirpath"]  # the logger's run directory
    checkpoint["every_n_train_steps"] = 3
    yaml.safe_dump(config, open(path, "w"), sort_keys=False)
    return path


def shown(run_dir, tag="train/loss") -> list[tuple[int, float]]:
    """(step, value) of ``tag`` as TensorBoard shows them (it applies the session starts)."""
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_a_resumed_run_shows_each_step_once(tmp_path, corpus):
    cache = str(tmp_path / "cache")
    with pytest.raises(SimulatedCrash):
        main(["fit", "--config", tensorboard_config(tmp_path, corpus, cache, crash_at=5)])
    run = tmp_path / "runs" / "tiny" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    before = shown(run)
    assert [s for s, _ in before] == [0, 1, 2, 3, 4]  # steps 3 and 4 logged past the checkpoint of step 3
    main(["fit", "--config", tensorboard_config(tmp_path, corpus, cache), "--ckpt_path", str(last)])
    assert sorted(os.listdir(tmp_path / "runs" / "tiny")) == ["version_0"]  # the resume went on in that directory
    after = shown(run)
    # step 3 twice: the interrupted run's (kept, as evaluations there would be) and the resumed run's first step,
    # with the same value (an exact resume); step 4 once, the interrupted run's hidden
    assert [s for s, _ in after] == [0, 1, 2, 3, 3, 4, 5, 6, 7]
    assert after[3][1] == after[4][1] == before[3][1]
    assert after[:4] == before[:4]
