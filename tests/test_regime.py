"""The failing regime end to end: `lightning-mamba fit` on the code corpus with random windows and a_lr_mult 10
writes a checkpoint (optimizer groups, data position, corpus manifest), the manifest beside the caches and in the
run, the lr multiplier in config.yaml and the decay dynamics."""

import glob
import json

import torch
import yaml

from lightning_mamba.cli import main

STEPS, BATCH, SEQ = 5, 4, 64


def run_config(tmp_path) -> str:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": STEPS, "limit_val_batches": 1, "val_check_interval": STEPS, "num_sanity_val_steps": 0,
            "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1, "accelerator": "cpu",
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path / "runs"), "name": "regime"}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"save_last": True, "every_n_train_steps": STEPS}},
                {"class_path": "lightning_mamba.callbacks.DecayDynamicsCallback",
                 "init_args": {"every_n_steps": 2}},
            ],
        },
        "model": {"d_model": 32, "n_layer": 2, "d_state": 16, "headdim": 16, "chunk_size": 32, "backend": "torch",
                  "warmup_steps": 1, "lr": 0.002, "min_lr_ratio": 0.1},
        "data": {"tokenizer": "byte", "seq_len": SEQ, "batch_size": BATCH, "cache_dir": str(tmp_path / "cache")},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_fit_on_code_with_random_windows_and_a_lr_mult(tmp_path):
    main(["fit", "--config", run_config(tmp_path), "--data.source", "code", "--data.code_max_bytes", "60000",
          "--data.val_fraction", "0.2", "--data.sampling", "random_windows", "--model.a_lr_mult", "10"])
    run = tmp_path / "runs" / "regime" / "version_0"

    # the manifest: beside the caches, in the run directory, in the logger's hparams and in the checkpoint
    [cached] = glob.glob(str(tmp_path / "cache" / "tokens-*-corpus.json"))
    with open(cached) as f:
        manifest = json.load(f)
    assert manifest["source"] == "code" and manifest["settings"]["max_bytes"] == 60000
    assert 0 < manifest["train"]["bytes"] + manifest["val"]["bytes"] <= 60000
    assert manifest["train"]["distributions"] and manifest["val"]["distributions"]
    assert {"name", "version", "files", "bytes"} == set(manifest["train"]["distributions"][0])
    with open(run / "corpus_manifest.json") as f:
        assert json.load(f) == manifest
    with open(run / "hparams.yaml") as f:
        hparams = yaml.safe_load(f)
    assert hparams["corpus"]["content_hash"] == manifest["content_hash"] and hparams["a_lr_mult"] == 10.0
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == STEPS
    data_state = ckpt["TextDataModule"]
    assert data_state["corpus_manifest"] == manifest
    sampler = data_state["train_sampler"]
    assert sampler["kind"] == "random_windows" and sampler["consumed"] == STEPS * BATCH
    assert sampler["num_offsets"] == manifest["tokens"]["train"] - SEQ

    # a_lr_mult: in config.yaml and the checkpoint's hparams; A_log and dt_bias in a group of their own at 10 x lr
    with open(run / "config.yaml") as f:
        config = yaml.safe_load(f)
    assert config["model"]["a_lr_mult"] == 10.0 and config["data"]["init_args"]["sampling"] == "random_windows"
    assert ckpt["hyper_parameters"]["a_lr_mult"] == 10.0
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert len(groups) == 3 and [g["initial_lr"] for g in groups] == [0.002, 0.002, 0.02]
    assert groups[2]["weight_decay"] == 0.0 and len(groups[2]["params"]) == 2 * 2  # A_log, dt_bias per layer
    assert 0 < groups[0]["lr"] < 0.002 and abs(groups[2]["lr"] / groups[0]["lr"] - 10) < 1e-9  # scheduled alike

    # the decay dynamics: at steps 0, 2, 4 and the end, in JSON and TensorBoard
    steps = sorted(int(p.split("_")[-1].split(".")[0]) for p in glob.glob(str(run / "dynamics" / "step_*.json")))
    assert steps == [0, 2, 4, 5]
    with open(run / "dynamics" / "step_5.json") as f:
        dyn = json.load(f)
    assert dyn["T"] == SEQ and len(dyn["A"]) == 2 and len(dyn["alpha_T"][0]) == len(dyn["A"][0])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"dynamics/A_median", "dynamics/heads_alpha_T_gt_0.99", "dynamics/alpha_T_median", "train/loss"} <= tags

    # the checkpoint names its held-out split: analyze/mitigate evaluate on the held-out code packages, not on the
    # embedded English corpus
    from lightning_mamba.commands.common import default_stream
    from lightning_mamba.data import load_tokenizer

    data = ckpt["lightning_mamba"]["data"]
    assert data["source"] == "code" and data["code_max_bytes"] == 60000 and data["val_fraction"] == 0.2
    stream = default_stream(load_tokenizer("byte"), SEQ, str(tmp_path / "cache"), data)
    assert len(stream) == manifest["tokens"]["val"]
