"""The NaN guard with a fused optimizer (training on CUDA): the verdict goes to the optimizer as ``found_inf`` (the
bad step changes nothing on the device) and is read one step later, so no step waits for the GPU."""

import math

import pytest
import torch

from lightning_mamba.training.nan_guard import NanGuard, NonFiniteError

from .helpers import RecordSteps
from .test_nan_guard import IN_PROJ, D, fit, helper

FUSED = {"class_path": "tests.robust.helpers.FusedOptimizer"}


def test_a_finite_fused_run_trains_and_reads_every_verdict(tmp_path, corpus, cache_dir):
    cli = fit(tmp_path, corpus, cache_dir, [FUSED, helper("RecordSteps")], steps=4)
    params = next(c for c in cli.trainer.callbacks if isinstance(c, RecordSteps)).params
    assert all(not torch.equal(params[i][IN_PROJ], params[i + 1][IN_PROJ]) for i in range(2))  # trained (the last step runs at lr 0)
    optimizer = cli.trainer.optimizers[0]
    assert optimizer.param_groups[0]["fused"] and float(optimizer.found_inf) == 0.0  # the deferred path ran
    guard = next(c for c in cli.trainer.callbacks if isinstance(c, NanGuard))
    assert guard.skipped == 0 and guard._pending is None  # the last verdict was read at the end


def test_infinite_gradient_stops_naming_its_step_and_the_update_never_lands(tmp_path, corpus, cache_dir):
    with pytest.raises(NonFiniteError, match=r"global step 2 \(epoch 0, batch 2\): a gradient is not finite "
                                             r"\(loss [0-9.]+, grad norm inf\)") as e:
        fit(tmp_path, corpus, cache_dir, [FUSED, helper("InfiniteGradient", step=2, name=IN_PROJ),
                                          helper("RecordSteps")])
    assert "\n" not in str(e.value)
    # every checkpoint left holds finite weights; the one the message advises exists
    for path in (tmp_path / "ckpt").glob("*.ckpt"):
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(t.isfinite().all() for t in state.values() if t.is_floating_point())
    # the checkpoint of the weights that gave the infinite gradient is put aside, as with the check every step
    assert (tmp_path / "ckpt" / "last.ckpt.nonfinite").exists() and "lightning-mamba fit --config" in str(e.value)


def test_skip_drops_the_failed_step_on_the_device(tmp_path, corpus, cache_dir):
    cli = fit(tmp_path, corpus, cache_dir, [FUSED, helper("InfiniteGradient", step=2, name=IN_PROJ),
                                            helper("RecordSteps")], on_nonfinite="skip")
    assert cli.trainer.global_step == 6
    record = next(c for c in cli.trainer.callbacks if isinstance(c, RecordSteps))
    before, skipped, after = record.params[1], record.params[2], record.params[3]
    assert all(torch.equal(before[n], skipped[n]) for n in before)  # step 2 changed nothing
    assert not all(torch.equal(skipped[n], after[n]) for n in skipped)  # step 3 trained again
    assert next(c for c in cli.trainer.callbacks if isinstance(c, NanGuard)).skipped == 1
    assert all(math.isfinite(v) for p in record.params[-1].values() for v in p.flatten().tolist())


def test_a_nan_weight_is_named_and_no_checkpoint_of_it_is_left(tmp_path, corpus, cache_dir):
    with pytest.raises(NonFiniteError, match=rf"global step 4 .*parameter {D} has 1/4 non-finite values"):
        fit(tmp_path, corpus, cache_dir, [FUSED, helper("PoisonParameter", step=4, name=D)])
    left = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    # the verdict is read before a checkpoint is written: the step-4 checkpoint (weights before the poison) stays last
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 4
    for path in left:
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(t.isfinite().all() for t in state.values() if t.is_floating_point()), path
