"""A resume with a larger max_steps keeps the run's lr schedule (its length is in the checkpoint): the WSD decay
that ended the first part is not re-stretched, so the lr does not jump back up; --model.replan_schedule true
plans it over the new length."""

import warnings

import pytest
import torch

from lightning_mamba.cli import main

from .conftest import logged_losses, run_config

LR_MONITOR = {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}}


def lrs(folder) -> dict[int, float]:
    return logged_losses(folder, metric="lr-AdamW/pg1")


@pytest.mark.parametrize("replan", [False, True])
def test_resume_with_more_steps_keeps_the_schedule_unless_asked(tmp_path, corpus, cache_dir, replan):
    cfg = run_config(tmp_path, corpus, cache_dir, 10, callbacks=[LR_MONITOR])
    main(["fit", "--config", cfg])
    first = lrs(tmp_path)
    assert first[9] < first[5]  # the WSD decay over the last steps of 10
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=False)["lr_schedule"]["total_steps"] == 10
    extra = ["--model.replan_schedule", "true"] if replan else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", "--config", run_config(tmp_path, corpus, cache_dir, 20, callbacks=[LR_MONITOR]),
              "--ckpt_path", str(last), *extra])
    said = [str(w.message) for w in caught if "resuming with the lr schedule" in str(w.message)]
    # the default min_lr_ratio 0 ends the schedule at lr 0: the warning says the steps past it change nothing
    assert said == ([] if replan else ["resuming with the lr schedule of the run's 10 steps (this run goes to 20; "
                                       "past the schedule's end the lr stays at its final value, 0: those steps will "
                                       "not change the weights): --model.replan_schedule true plans it over 20 "
                                       "instead"])
    later = lrs(tmp_path)
    if replan:
        assert later[12] == pytest.approx(first[5])  # back at the peak: planned over 20 steps
        assert torch.load(last, weights_only=False)["lr_schedule"]["total_steps"] == 20
    else:
        assert all(later[s] <= first[9] for s in range(10, 20))  # stays at the schedule's end, no jump up
        assert torch.load(last, weights_only=False)["lr_schedule"]["total_steps"] == 10
