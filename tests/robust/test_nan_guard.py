"""NaN/Inf in a real run: stopped at the step it appears, naming the first non-finite tensor; or skipped."""

import math

import pytest
import torch

from lightning_mamba.cli import lightning_cli
from lightning_mamba.training.nan_guard import NanGuard, NonFiniteError

from .conftest import logged_losses, run_config
from .helpers import RecordSteps

D = "model.backbone.layers.1.mixer.D"
IN_PROJ = "model.backbone.layers.0.mixer.in_proj.weight"


def helper(cls: str, **init_args) -> dict:
    return {"class_path": f"tests.robust.helpers.{cls}", "init_args": init_args}


def fit(tmp_path, corpus, cache_dir, callbacks, steps=6, **guard):
    """A CLI fit; the NanGuard is on in every run (`--nan_guard.*`), as a user gets it."""
    guard_args = [a for k, v in guard.items() for a in (f"--nan_guard.{k}", str(v))]
    return lightning_cli(["fit", "--config", run_config(tmp_path, corpus, cache_dir, steps, callbacks=callbacks),
                          *guard_args])


def test_nan_weight_stops_the_run_naming_step_and_parameter(tmp_path, corpus, cache_dir):
    with pytest.raises(NonFiniteError) as e:
        fit(tmp_path, corpus, cache_dir, [helper("PoisonParameter", step=4, name=D)])
    message = str(e.value)
    assert "\n" not in message
    assert "global step 4 (epoch 0, batch 4)" in message
    assert f"parameter {D} has 1/4 non-finite values" in message and "loss nan" in message
    assert "on_nonfinite=skip" in message  # the way out
    # stopped before the optimizer step: the last checkpoint is the step before, and finite
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 4
    assert all(t.isfinite().all() for t in last["state_dict"].values())


def test_infinite_gradient_stops_naming_the_parameter_and_grad_norm(tmp_path, corpus, cache_dir):
    with pytest.raises(NonFiniteError, match=rf"global step 2 \(epoch 0, batch 2\): the gradient of {IN_PROJ} has "
                                             rf"\d+/\d+ non-finite values \(loss [0-9.]+, grad norm inf\)"):
        fit(tmp_path, corpus, cache_dir, [helper("InfiniteGradient", step=2, name=IN_PROJ)])


def test_skip_drops_the_step_counts_it_and_trains_on(tmp_path, corpus, cache_dir):
    cli = fit(tmp_path, corpus, cache_dir, [helper("InfiniteGradient", step=2, name=IN_PROJ), helper("RecordSteps")],
              on_nonfinite="skip")
    assert cli.trainer.global_step == 6  # the run went on to the end
    record = next(c for c in cli.trainer.callbacks if isinstance(c, RecordSteps))
    before, skipped, after = record.params[1], record.params[2], record.params[3]
    assert all(torch.equal(before[n], skipped[n]) for n in before)  # step 2 changed nothing
    assert not all(torch.equal(skipped[n], after[n]) for n in skipped)  # step 3 trained again
    nan_guard = next(c for c in cli.trainer.callbacks if isinstance(c, NanGuard))
    assert nan_guard.skipped == 1
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]["NanGuard"] == {"skipped": 1}
    logged = logged_losses(tmp_path, metric="train/skipped_batches")
    assert logged[1] == 0 and logged[2] == 1 and logged[5] == 1
    assert all(math.isfinite(v) for v in logged_losses(tmp_path).values())


def test_skip_gives_up_when_the_weights_stay_broken(tmp_path, corpus, cache_dir):
    with pytest.raises(NonFiniteError, match=r"global step 3 .*and the 2 steps before it were skipped too"):
        fit(tmp_path, corpus, cache_dir, [helper("PoisonParameter", step=1, name=D)], on_nonfinite="skip",
            max_skips_in_a_row=2)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="on_nonfinite='ignore' is unknown: use 'stop' or 'skip'"):
        NanGuard(on_nonfinite="ignore")
