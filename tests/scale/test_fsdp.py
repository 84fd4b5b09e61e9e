"""Lightning's FSDPStrategy in a real 2-process run on CPU (gloo; the strategy settings are configs/trainer/
fsdp.yaml's, helpers.CPUFSDPStrategy only lifts Lightning's GPU requirement), against one process trained on the
global batch: the clip takes the global gradient norm, the AdamW groups and the FLOPs are the unsharded model's,
the forgetting observers evaluate the unsharded model, and the NaN guard's verdict is every rank's."""

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml

from lightning_mamba.analysis.evaluator import read_position_losses_csv
from lightning_mamba.training.module import MambaLitModule
from lightning_mamba.training.sharding import unsharded_copy, unwrapped_name
from tests.robust.conftest import write_corpus
from tests.scale.helpers import ROOT, fit_at_once, write_config

PER_RANK_BATCH, STEPS, NAN_STEP = 4, 4, 3
VOCAB = 257  # byte tokenizer (the model's vocabulary is padded to 264)

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")


def callbacks(record_dir: str) -> list[dict]:
    return [
        {"class_path": "tests.scale.helpers.RecordSharded", "init_args": {"out": record_dir}},
        {"class_path": "tests.scale.helpers.NaNGradientOnLastRank", "init_args": {"step": NAN_STEP}},
        {"class_path": "lightning_mamba.callbacks.LengthGeneralizationCallback",
         "init_args": {"multiples": [1, 2], "n_rows": 1, "piece_len": 64}},
        {"class_path": "lightning_mamba.callbacks.StateStatsCallback",
         "init_args": {"multiples": [1, 2], "probes": ["text"], "stride": 16}},
    ]


def fsdp_cpu_strategy() -> dict:
    with open(os.path.join(ROOT, "configs", "trainer", "fsdp.yaml")) as f:
        strategy = yaml.safe_load(f)["strategy"]
    return {"class_path": "tests.scale.helpers.CPUFSDPStrategy",
            "init_args": {**strategy["init_args"], "process_group_backend": "gloo"}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run twice: FSDP on 2 processes with PER_RANK_BATCH samples each, and 1 process with 2 x as many;
    both validate (and run the observers) at steps 2 and 4, and get a NaN gradient at NAN_STEP on their last rank,
    which the NaN guard skips."""
    tmp = tmp_path_factory.mktemp("fsdp")
    corpus = write_corpus(tmp / "texts")
    common = dict(limit_val_batches=1, val_check_interval=2, num_sanity_val_steps=0)
    for folder in ("one", "fsdp"):
        os.makedirs(tmp / folder)
    # a token cache each: the two runs go at once, and the FSDP run builds its own (rank 0's prepare_data)
    one = write_config(str(tmp / "one" / "run.yaml"), corpus, str(tmp / "one" / "cache"), "", 2 * PER_RANK_BATCH,
                       STEPS, callbacks(str(tmp / "one" / "record")), **common)
    fsdp = write_config(str(tmp / "fsdp" / "run.yaml"), corpus, str(tmp / "fsdp" / "cache"), "", PER_RANK_BATCH,
                        STEPS, callbacks(str(tmp / "fsdp" / "record")), devices=2, strategy=fsdp_cpu_strategy(),
                        **common)
    fit_at_once(["--config", one, "--nan_guard.on_nonfinite", "skip"],
                ["--config", fsdp, "--nan_guard.on_nonfinite", "skip"])
    return {"one": torch.load(tmp / "one" / "record" / "rank0.pt"), "one_dir": tmp / "one",
            "ranks": [torch.load(tmp / "fsdp" / "record" / f"rank{r}.pt") for r in range(2)], "fsdp_dir": tmp / "fsdp"}


@needs_gloo
def test_the_run_is_sharded_over_two_processes_on_the_global_batch(runs):
    one, ranks = runs["one"], runs["ranks"]
    assert [(r["world_size"], r["rank"], r["wrapper"]) for r in ranks] == [
        (2, 0, "FullyShardedDataParallel"), (2, 1, "FullyShardedDataParallel")]
    assert one["wrapper"] == "MambaLitModule" and one["step"] == STEPS and all(r["step"] == STEPS for r in ranks)
    for k in range(STEPS):  # together the ranks train on the one process's batch
        both = torch.cat([r["batches"][k] for r in ranks])
        assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, one["batches"][k].tolist()))


@needs_gloo
def test_clipping_takes_the_global_gradient_norm(runs):
    one, ranks = runs["one"], runs["ranks"]
    for k in range(STEPS):
        n0, n1, n = ranks[0]["logged_norms"][k], ranks[1]["logged_norms"][k], one["logged_norms"][k]
        if k == NAN_STEP:  # skipped by every rank: no gradients left to clip
            assert n0 == n1 == n == 0
            continue
        assert n0 == n1 and n0 == pytest.approx(n, rel=1e-5), f"step {k}"  # the unsharded model's norm
        # what each rank holds is its shard alone: its own norm is smaller, and not the other's
        local = [r["local_norms"][k] for r in ranks]
        assert max(local) < n0 and local[0] != local[1]
        assert math.hypot(*local) == pytest.approx(n0, rel=1e-5)


@needs_gloo
def test_adamw_groups_are_the_unsharded_models(runs):
    one, ranks = runs["one"], runs["ranks"]
    (wd, decay), (wd0, no_decay) = one["groups"]
    assert wd == 0.1 and wd0 == 0.0 and decay and no_decay
    assert {".".join(n.split(".")[-2:]) for n in no_decay} >= {"mixer.A_log", "mixer.dt_bias", "mixer.D", "norm.weight",
                                                               "conv1d.bias", "norm_f.weight"}
    assert all(r["groups"] == one["groups"] for r in ranks)  # the same names in the same groups on every rank


@needs_gloo
def test_flops_per_batch_is_the_unsharded_models(runs):
    one, ranks = runs["one"], runs["ranks"]
    for r in ranks:  # linear in the batch size: each rank has half the one process's batch
        assert [2 * f for f in r["flops"]] == one["flops"]
    assert one["flops"][0] > 6 * 2 * PER_RANK_BATCH * 64 * 32 * 264  # at least the LM head's


@needs_gloo
def test_nan_guard_skips_on_every_rank_when_one_rank_sees_a_nan(runs):
    one, ranks = runs["one"], runs["ranks"]
    assert one["skipped"] == 1
    assert [r["skipped"] for r in ranks] == [1, 1]  # the NaN was in rank 1's shard only


@needs_gloo
@pytest.mark.parametrize("observer", ["lengthgen", "state_stats"])
def test_observers_evaluate_the_unsharded_model(runs, observer):
    for step in (2, 4):
        ref = json.loads((runs["one_dir"] / observer / f"step_{step}.json").read_text())
        got = json.loads((runs["fsdp_dir"] / observer / f"step_{step}.json").read_text())
        if observer == "lengthgen":
            a, b = (read_position_losses_csv(str(d / observer / r["per_position_csv"]))
                    for d, r in ((runs["fsdp_dir"], got), (runs["one_dir"], ref)))
            assert a.shape == (2 * 64,) and np.isfinite(a).all()
        else:
            a, b = np.array(got["text"]["stats"]["rms"]), np.array(ref["text"]["stats"]["rms"])
            assert a.size and np.isfinite(a).all()
        # the weights differ by rounding only (fp32 reductions in another order)
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5, err_msg=f"{observer} step {step}")


# ---- the pieces, in one process ------------------------------------------------------------------------------
def test_unsharded_copy_is_the_same_model_and_leaves_the_random_state_alone():
    torch.manual_seed(0)
    model = MambaLitModule(d_model=32, n_layer=2, d_state=16, headdim=16, chunk_size=32, backend="torch",
                           vocab_size=VOCAB).model
    rng = torch.get_rng_state()
    copy = unsharded_copy(model)
    assert torch.equal(torch.get_rng_state(), rng)  # rank 0 alone makes it: the ranks' random streams stay equal
    ids = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        assert torch.equal(copy(ids)[0], model(ids)[0])
    head, embedding = copy.lm_head.weight, copy.backbone.embedding.weight
    assert head.data_ptr() == embedding.data_ptr() != model.lm_head.weight.data_ptr()  # tied, and a copy


def test_unwrapped_name_drops_the_fsdp_and_checkpoint_segments():
    name = "model.backbone.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.mixer.A_log"
    assert unwrapped_name(name) == "model.backbone.layers.0.mixer.A_log"
    assert unwrapped_name("model.lm_head.weight") == "model.lm_head.weight"
