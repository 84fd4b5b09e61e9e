"""A run that stops early (--trainer.max_time mid-run: how a study's cells share a device session; or a callback's
stop): last.ckpt is saved at the step where it stopped, also when ModelCheckpoint saved at its interval earlier in the
run (training.stops.CheckpointAtStop), and the resumed run gives the losses of the uninterrupted one to the last bit
(CPU)."""

import lightning as L
import torch
import yaml

from lightning_mamba.cli import main

from .conftest import logged_losses, run_config
from .test_sigterm import STEPS, config


def test_a_time_limit_saves_the_step_it_stopped_at_and_resumes_exactly(tmp_path, corpus, cache_dir):
    assert torch.get_num_threads() == 1
    main(["fit", "--config", config(tmp_path / "reference", corpus, cache_dir)])
    reference = logged_losses(tmp_path / "reference")

    folder = tmp_path / "run"
    cfg = config(folder, corpus, cache_dir, progress=str(tmp_path / "progress"))  # 0.3 s a step
    main(["fit", "--config", cfg, "--trainer.max_time", "00:00:00:01"])
    last = folder / "ckpt" / "last.ckpt"
    assert last.exists()  # the run's interval is 100 steps: this one is the stop's
    stopped_at = torch.load(last, weights_only=True)["global_step"]
    assert 1 <= stopped_at < STEPS
    assert sorted(logged_losses(folder)) == list(range(stopped_at))

    main(["fit", "--config", config(folder, corpus, cache_dir), "--ckpt_path", str(last)])
    resumed = logged_losses(folder, version=str(folder / "runs" / "tiny" / "version_1"))
    assert sorted(resumed) == list(range(stopped_at, STEPS))
    assert resumed == {s: reference[s] for s in resumed}  # exact, no tolerance


class StopAt(L.Callback):
    """Stop training after global step ``step``, as a time limit or EarlyStopping would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def interval_config(folder, corpus, cache_dir, every: int, stop_at: int | None = None) -> str:
    callbacks = [{"class_path": "tests.robust.test_time_limit.StopAt", "init_args": {"step": stop_at}}] if stop_at else []
    path = run_config(folder, corpus, cache_dir, STEPS, callbacks=callbacks)
    with open(path) as f:
        cfg = yaml.safe_load(f)
    cfg["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = every
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def test_a_stop_past_an_interval_checkpoint_saves_the_step_it_stopped_at(tmp_path, corpus, cache_dir):
    # ModelCheckpoint writes last.ckpt at the end of training only when it wrote none in the run: a stop at step 5
    # with an interval of 2 left last.ckpt at step 4, and a study's resume redid up to an interval of steps
    main(["fit", "--config", interval_config(tmp_path / "reference", corpus, cache_dir, every=100)])
    reference = logged_losses(tmp_path / "reference")
    folder = tmp_path / "run"
    main(["fit", "--config", interval_config(folder, corpus, cache_dir, every=2, stop_at=5)])
    last = folder / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 5  # was 4
    main(["fit", "--config", interval_config(folder, corpus, cache_dir, every=2), "--ckpt_path", str(last)])
    resumed = logged_losses(folder, version=str(folder / "runs" / "tiny" / "version_1"))
    assert sorted(resumed) == list(range(5, STEPS))
    assert resumed == {s: reference[s] for s in resumed}  # exact, no tolerance
