"""No step waits for the GPU outside the logging steps (issue [throughput] item 4): between them a training step turns
no tensor into a Python value and logs no Python number (on CUDA either waits for the GPU to finish the step, which
leaves it idle while the host prepares the next one), yet the logger, the progress bar and callback_metrics get the
values they got before. Checked on the CPU by counting the conversions (tests/robust/helpers.CountConversions)."""

import json

import pytest

from lightning_mamba.cli import lightning_cli

from .conftest import logged_losses, run_config
from .helpers import CountConversions, RecordLossAndBar
from .test_nan_guard import IN_PROJ, helper

FUSED = {"class_path": "tests.robust.helpers.FusedOptimizer"}  # the NaN guard's deferred check, as on CUDA
MONITORS = [{"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
            {"class_path": "lightning_mamba.callbacks.TokenThroughputMonitor"}]  # a CLI run's training-time callbacks


def fit(tmp_path, corpus, cache_dir, callbacks, steps=9, log_every=4, bar=False, checkpoints=False, guard=()):
    """A CLI fit of the tiny config; ``checkpoints``: its checkpoint after every step stays (else the callback list
    is ``callbacks`` alone)."""
    config = run_config(tmp_path, corpus, cache_dir, steps, callbacks=callbacks if checkpoints else ())
    args = ["fit", "--config", config, "--trainer.log_every_n_steps", str(log_every),
            "--trainer.enable_progress_bar", str(bar).lower(), "--trainer.gradient_clip_val", "1.0", *guard]
    if not checkpoints:
        args += ["--trainer.enable_checkpointing", "false", "--trainer.callbacks", json.dumps(callbacks)]
    return lightning_cli(args)


def callback(cli, cls):
    return next(c for c in cli.trainer.callbacks if isinstance(c, cls))


def test_steps_between_logging_steps_convert_no_tensor_and_log_no_number(tmp_path, corpus, cache_dir):
    cli = fit(tmp_path, corpus, cache_dir, [FUSED, *MONITORS, helper("CountConversions")])
    steps = callback(cli, CountConversions).steps
    assert [s["logging"] for s in steps] == [False, False, False, True, False, False, False, True]
    for i, step in enumerate(steps):
        if not step["logging"]:
            assert step["conversions"] == [], f"step {i}"  # before: Lightning's .item() of the progress-bar loss
            assert all(is_tensor and not prog_bar for _, is_tensor, prog_bar in step["logged"]), f"step {i}"
        names = {name for name, _, _ in step["logged"]}
        # per-step values reach self.log only where the logger reads them (~0.3-0.6 ms of host time a call)
        assert ({"train/loss", "train/grad_norm"} <= names) == step["logging"], f"step {i}: {names}"
        assert "loss" not in names  # no progress bar: no bar copy
    # the counter works: at the logging steps the logger turns the logged tensors into numbers
    assert all(len(s["conversions"]) >= 3 for s in steps if s["logging"])
    # train/skipped_batches (unchanged 0): at the first step and where the logger reads it, not at every step
    assert [any(n == "train/skipped_batches" for n, _, _ in s["logged"]) for s in steps] == [
        True, False, False, True, False, False, False, True]


def test_the_logger_and_the_progress_bar_get_the_loss_at_the_logging_steps(tmp_path, corpus, cache_dir, capsys):
    cli = fit(tmp_path, corpus, cache_dir, [FUSED, helper("RecordLossAndBar")], steps=8, log_every=3, bar=True)
    record = callback(cli, RecordLossAndBar)
    losses = record.losses
    assert logged_losses(tmp_path) == pytest.approx({2: losses[2], 5: losses[5]})  # steps 2 and 5 log (every 3rd)
    # the bar shows the loss of the last logging step (a number on the host), not train/loss after every step
    assert [bar.get("loss") for bar in record.bars] == [None, None, *[pytest.approx(losses[2])] * 3,
                                                        *[pytest.approx(losses[5])] * 3]
    assert not any("train/loss" in bar for bar in record.bars)


def test_skipped_batches_logged_and_in_callback_metrics_as_when_logged_every_step(tmp_path, corpus, cache_dir):
    cli = fit(tmp_path, corpus, cache_dir, [FUSED, helper("InfiniteGradient", step=2, name=IN_PROJ),
                                            helper("RecordLossAndBar")],
              steps=7, log_every=2, checkpoints=True, guard=["--nan_guard.on_nonfinite", "skip"])
    # step 2 is skipped on the device; its verdict is read at its end (a checkpoint follows every step), after the
    # step logged its count: the count shows from step 3 on, as it did when the guard logged it at every step
    assert callback(cli, RecordLossAndBar).skipped == [0, 0, 0, 1, 1, 1, 1]
    assert logged_losses(tmp_path, metric="train/skipped_batches") == {1: 0, 3: 1, 5: 1}


def test_a_fit_stopped_between_logging_steps_writes_that_steps_loss(tmp_path, corpus, cache_dir):
    """Lightning writes the metrics of the step where training stops (max_time, should_stop): the held per-step values
    are logged there, not the last logging step's left in place."""
    stop = {"class_path": "tests.robust.helpers.StopAfterBatch", "init_args": {"batch": 4}}
    cli = fit(tmp_path, corpus, cache_dir, [FUSED, helper("RecordLossAndBar"), stop], steps=8, log_every=3)
    losses = callback(cli, RecordLossAndBar).losses
    assert len(losses) == 5 and cli.trainer.global_step == 5
    assert logged_losses(tmp_path) == pytest.approx({2: losses[2], 4: losses[4]})
    assert logged_losses(tmp_path, metric="train/grad_norm").keys() == {2, 4}
