"""The CLI end to end: `lightning-mamba fit` writes events, config and checkpoint; make train's line parses."""

import glob
import os
import shlex
import subprocess

import pytest
import torch

from lightning_mamba.cli import lightning_cli, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_args(tmp_path, corpus):
    return [
        "--config", os.path.join(ROOT, "configs/train.yaml"),
        "--model.d_model", "32", "--model.n_layer", "2", "--model.d_state", "16", "--model.headdim", "16",
        "--model.chunk_size", "32", "--model.backend", "torch", "--model.warmup_steps", "2",
        "--data.source", corpus, "--data.tokenizer", "byte", "--data.seq_len", "64", "--data.batch_size", "4",
        "--data.cache_dir", str(tmp_path / "cache"),
        "--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.logger.init_args.name", "tiny",
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "2",
    ]


def test_fit_writes_events_config_and_checkpoint_then_resumes_validates_tests_and_predicts(tmp_path, corpus, capsys,
                                                                                           recwarn):
    """One tiny fit (~5 s) serves three checks in turn, each of which needed that same fit: what it writes; a resume
    goes on in its run directory; validate, test and predict run on its checkpoint."""
    main(["fit", *tiny_args(tmp_path, corpus)])
    run = tmp_path / "runs" / "tiny" / "version_0"
    out = capsys.readouterr().out
    summary = out[out.index("fit done at step 6"):]  # one summary block at the end
    assert f"run directory:   {os.path.relpath(run)}" in summary
    assert f"last checkpoint: {os.path.relpath(run / 'checkpoints' / 'last.ckpt')}" in summary
    assert "final val loss:  " in summary and "none" not in summary.split("final val loss:")[1].splitlines()[0]
    assert ("forgetting:      forgets (blow-up: none" in summary or "forgetting:      FAILS to forget" in summary)
    assert "at step 6" in summary.split("forgetting:")[1]
    assert glob.glob(str(run / "events.out.tfevents.*"))
    assert (run / "config.yaml").exists()
    ckpts = glob.glob(str(run / "checkpoints" / "*.ckpt"))
    assert any(c.endswith("last.ckpt") for c in ckpts)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    meta = ckpt["lightning_mamba"]
    assert meta["seq_len"] == 64 and meta["tokenizer"]["kind"] == "byte" and meta["mamba_config"]["vocab_size"] == 257

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "val/loss", "val/ppl"} <= set(tags)
    assert "hp_metric" not in tags  # no -1 placeholder

    # a resume goes on in the run directory (before validate and test add version_1, version_2 beside it)
    main(["fit", *tiny_args(tmp_path, corpus), "--trainer.max_steps", "8",
          "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert sorted(os.listdir(tmp_path / "runs" / "tiny")) == ["version_0"]  # no version_1
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 8
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]
    assert not [w for w in recwarn if "exists and is not empty" in str(w.message)]  # its own folder: no warning

    # validate, test and predict run on the checkpoint
    ckpt = str(run / "checkpoints" / "last.ckpt")
    # the run's own config.yaml (which, resumed, records version 0): the evaluation gets a version of its own
    config, events = (run / "config.yaml").read_bytes(), sorted(glob.glob(str(run / "events.out.tfevents.*")))
    main(["validate", "--config", str(run / "config.yaml"), "--ckpt_path", ckpt])
    assert (run / "config.yaml").read_bytes() == config and sorted(glob.glob(str(run / "events.*"))) == events
    evaluation = tmp_path / "runs" / "tiny" / "version_1"
    assert (evaluation / "config.yaml").exists()
    # ... filed under the checkpoint's step (Lightning's validate counts from 0), its TensorBoard points too
    assert sorted(os.listdir(evaluation / "lengthgen")) == ["step_8.csv", "step_8.json"]
    acc = EventAccumulator(str(evaluation))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/loss")] == [8] and [e.step for e in acc.Scalars("lengthgen/loss@1x")] == [8]
    main(["test", *tiny_args(tmp_path, corpus), "--ckpt_path", ckpt])
    cli = lightning_cli(["predict", *tiny_args(tmp_path, corpus), "--ckpt_path", ckpt, "--trainer.limit_predict_batches", "1"])
    out = cli.trainer.predict_loop.predictions
    assert out and out[0]["token_losses"].shape == (4, 64) and torch.isfinite(out[0]["token_losses"]).all()
    # ... and predict keeps them: LightningCLI drops what trainer.predict returns, so a prediction writer saves them
    (written,) = glob.glob(str(tmp_path / "runs" / "tiny" / "version_*" / "token_losses.pt"))
    record = torch.load(written, weights_only=True)
    assert torch.equal(record["token_losses"], out[0]["token_losses"]) and record["sample_indices"] == [0, 1, 2, 3]
    assert record["ckpt_path"] == ckpt


def test_fit_trains_with_the_quadratic_scan(tmp_path, corpus):
    """--model.quadratic_max_len, --model.save_chunk_states and --model.recompute_norm_output reach every mixer, the
    checkpoint's config and hyper_parameters; training and validation run through the attention form (seq_len 64 <=
    64)."""
    cli = lightning_cli(["fit", *tiny_args(tmp_path, corpus), "--model.quadratic_max_len", "64",
                         "--model.save_chunk_states", "true", "--model.recompute_norm_output", "true",
                         "--trainer.max_steps", "3"])
    assert [(m.quadratic_max_len, m.save_chunk_states, m.recompute_norm_output)
            for m in cli.model.model.mixers] == [(64, True, True)] * 2
    assert cli.trainer.global_step == 3 and torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    ckpt = torch.load(tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["hyper_parameters"]["quadratic_max_len"] == 64 and ckpt["hyper_parameters"]["save_chunk_states"]
    ssm_cfg = ckpt["lightning_mamba"]["mamba_config"]["ssm_cfg"]
    assert ssm_cfg["quadratic_max_len"] == 64 and ssm_cfg["save_chunk_states"] is True
    assert ssm_cfg["recompute_norm_output"] is True and ckpt["hyper_parameters"]["recompute_norm_output"]


def test_noise_is_off_and_verdicts_read_in_words():
    import logging
    import warnings

    from torch.utils._pytree import LeafSpec

    from lightning_mamba.analysis.criterion import verdict_text
    from lightning_mamba.training.cli import quiet_lightning

    quiet_lightning()
    tip = logging.LogRecord("lightning.pytorch.utilities.rank_zero", logging.INFO, "", 0,
                            "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
                            None, None)
    assert not logging.getLogger("lightning.pytorch.utilities.rank_zero").filter(tip)
    with warnings.catch_warnings(record=True) as caught:
        LeafSpec()
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
    v = {"forgets": False, "blowup_position": -1, "seq_len": 64, "ratio_long_over_in": 2.5}
    assert verdict_text(v) == "FAILS to forget (blow-up at position none, ratio [4T,16T]/[T/2,T] 2.500)"
    assert verdict_text({**v, "forgets": True}).startswith("forgets (blow-up: none")
    assert "position 128 (2.0 x T)" in verdict_text({**v, "blowup_position": 128})


def make_train_line(**knobs) -> list[str]:
    """The command `make train` would run, as argv for the CLI (without the program name and subcommand)."""
    env = {k: str(v) for k, v in knobs.items()}
    out = subprocess.run(["make", "-n", "-s", "train", *(f"{k}={v}" for k, v in env.items())], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.replace("\\\n", " ").splitlines() if "lightning-mamba fit" in l)
    argv = shlex.split(line)
    return argv[argv.index("fit") + 1:]


def test_make_train_line_parses_with_state_and_len():
    argv = make_train_line(STATE=32, LEN=256, STEPS=7)
    argv = [a if not a.startswith("configs/") else os.path.join(ROOT, a) for a in argv]
    cli = lightning_cli(argv, run=False)
    assert cli.model.hparams.d_state == 32
    assert cli.datamodule.hparams.seq_len == 256
    assert cli.datamodule.hparams.batch_size == 4096 // 256
    assert cli.trainer.max_steps == 7
    assert cli.model.hparams.vocab_size == cli.datamodule.vocab_size_for_model


@pytest.mark.parametrize("typed,expected", [("1", 1), ("3", 3), ("0.5", 0.5), ("1.0", 1.0)])
def test_batch_limits_typed_as_ints_stay_ints(typed, expected, tmp_path):
    # Lightning reads an int as a number of batches and a float as a fraction: 1 is one batch, 1.0 every batch.
    # Python's typing cache handed the Trainer Union[float, int], so a typed 1 used to become 1.0 (all batches).
    cli = lightning_cli(["--config", os.path.join(ROOT, "configs/train.yaml"), "--trainer.logger", "false",
                         "--trainer.limit_val_batches", typed, "--trainer.limit_train_batches", typed], run=False)
    for limit in (cli.trainer.limit_val_batches, cli.trainer.limit_train_batches):
        assert limit == expected and type(limit) is type(expected)
    assert type(cli.config.trainer.limit_val_batches) is type(expected)


@pytest.mark.parametrize(
    "override,fragment",
    [
        (["--data.seq_len", "1"], "data.seq_len must be >= 2"),
        (["--data.source", "/nonexistent/texts"], "/nonexistent/texts"),
        (["--model.headdim", "24"], "headdim=24 must divide"),
        (["--data.tokenizer", "wordpiece"], "unknown tokenizer"),
        (["--model.backend", "tpu"], "unknown backend"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, corpus, capsys, override, fragment):
    with pytest.raises(SystemExit) as e:
        main(["fit", *tiny_args(tmp_path, corpus), *override])
    message = str(e.value.code) if not isinstance(e.value.code, int) else capsys.readouterr().err
    assert fragment in message
    assert "Traceback" not in message
    assert not glob.glob(str(tmp_path / "cache" / "*.tmp*"))  # no half-written cache


def refused(argv: list[str]) -> str:
    """Run the CLI; it must end in a one-line error: return it."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    return e.value.code


# data settings found bad only when the data module sets up or builds its loaders: after the logger made its folder
REFUSED_BY_THE_DATA = [["--data.seq_len", "100000"], ["--data.batch_size", "5000"]]


def test_a_refused_fit_leaves_no_run_directory(tmp_path, corpus):
    """Its version folder (events, hparams.yaml, config.yaml, no step) is taken back: the next run is version_0, and
    a refusal after it leaves that run as it was."""
    runs = tmp_path / "runs" / "tiny"
    assert "is larger than the validation split" in refused(["fit", *tiny_args(tmp_path, corpus),
                                                              *REFUSED_BY_THE_DATA[0]])
    assert os.listdir(runs) == []
    main(["fit", *tiny_args(tmp_path, corpus), "--trainer.max_steps", "3"])
    assert os.listdir(runs) == ["version_0"]
    files = {p: os.path.getmtime(p) for p in glob.glob(str(runs / "version_0" / "**"), recursive=True)}
    for bad in REFUSED_BY_THE_DATA:
        assert "is larger than the" in refused(["fit", *tiny_args(tmp_path, corpus), *bad])
    assert os.listdir(runs) == ["version_0"]
    assert {p: os.path.getmtime(p) for p in glob.glob(str(runs / "version_0" / "**"), recursive=True)} == files


def test_a_refused_fit_with_a_tensorboard_sub_dir_leaves_no_version_folder(tmp_path, corpus):
    """With the logger's sub_dir the events go to version_<n>/<sub_dir>/: taking back only that left an empty
    version_<n> that pushed the next run to n+1."""
    runs = tmp_path / "runs" / "tiny"
    assert "is larger than the" in refused(["fit", *tiny_args(tmp_path, corpus), "--trainer.logger.init_args.sub_dir",
                                            "tb", *REFUSED_BY_THE_DATA[0]])
    assert os.listdir(runs) == []


def test_a_fit_stopped_at_its_first_step_keeps_its_run_directory(tmp_path, corpus):
    """A non-finite first step (global step 0, nothing checkpointed) stops a run that has started training: its folder
    stays, unlike a refused one's before it."""
    runs = tmp_path / "runs" / "tiny"
    refused(["fit", *tiny_args(tmp_path, corpus), *REFUSED_BY_THE_DATA[1]])
    message = refused(["fit", *tiny_args(tmp_path, corpus), "--trainer.callbacks+=tests.robust.helpers.PoisonParameter",
                       "--trainer.callbacks.step", "0", "--trainer.callbacks.name", "model.backbone.layers.1.mixer.D"])
    assert "global step 0" in message
    assert os.listdir(runs) == ["version_0"]
    assert glob.glob(str(runs / "version_0" / "events.out.tfevents.*")) and (runs / "version_0" / "config.yaml").exists()


def test_a_refused_resume_keeps_the_run_directory_it_resumes(tmp_path, corpus):
    """--ckpt_path into version_0 goes on in that folder (resume_into_run_directory): refused, the folder and its
    checkpoint stay; a refused fresh run beside it leaves no version_1."""
    runs = tmp_path / "runs" / "tiny"
    main(["fit", *tiny_args(tmp_path, corpus), "--trainer.max_steps", "3"])
    ckpt = runs / "version_0" / "checkpoints" / "last.ckpt"
    run = runs / "version_0"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}  # events, config.yaml, hparams.yaml
    saved = ckpt.read_bytes()
    refused(["fit", *tiny_args(tmp_path, corpus), *REFUSED_BY_THE_DATA[1]])
    assert "is larger than the" in refused(["fit", *tiny_args(tmp_path, corpus), *REFUSED_BY_THE_DATA[1],
                                            "--ckpt_path", str(ckpt)])
    assert os.listdir(runs) == ["version_0"]
    assert ckpt.read_bytes() == saved and glob.glob(str(runs / "version_0" / "events.out.tfevents.*"))
    # the run's own files as they were: no second events file, its config.yaml not the refused settings
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert {"config.yaml", "hparams.yaml"} <= set(before)


def test_fit_without_a_logger_runs_with_the_default_config(tmp_path, corpus, capsys, caplog):
    """`--trainer.logger false` on configs/train.yaml: its LearningRateMonitor (which Lightning refuses without a
    logger, after the sanity check) is left out with a line, and the run's files go to trainer.default_root_dir."""
    root = tmp_path / "root"
    caplog.set_level("INFO")
    main(["fit", *tiny_args(tmp_path, corpus), "--trainer.logger", "false", "--trainer.default_root_dir", str(root),
          "--trainer.max_steps", "3"])
    assert "LearningRateMonitor callback is left out" in caplog.text
    assert "fit done at step 3" in capsys.readouterr().out
    assert (root / "checkpoints" / "last.ckpt").exists() and (root / "val" / "step_3.json").exists()


def test_default_root_dir_moves_the_run_directory(tmp_path):
    """`--trainer.default_root_dir DIR` (typed or from a config file) is where configs/train.yaml's logger writes,
    DIR/<name>/version_<n>; a typed logger save_dir wins. Lightning reads it only where no logger is set, so it
    used to do nothing."""
    root = tmp_path / "root"
    base = ["--config", os.path.join(ROOT, "configs/train.yaml"), "--data.tokenizer", "byte",
            "--data.cache_dir", str(tmp_path / "cache")]
    cli = lightning_cli([*base, "--trainer.default_root_dir", str(root)], run=False)
    assert cli.trainer.logger.save_dir == str(root) and cli.trainer.default_root_dir == str(root)
    overlay = tmp_path / "root.yaml"
    overlay.write_text(f"trainer:\n  default_root_dir: {root}\n")
    cli = lightning_cli([*base, "--config", str(overlay)], run=False)
    assert cli.trainer.logger.save_dir == str(root)
    cli = lightning_cli([*base, "--trainer.default_root_dir", str(root),
                         "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")], run=False)
    assert cli.trainer.logger.save_dir == str(tmp_path / "logs")
    cli = lightning_cli(base, run=False)
    assert cli.trainer.logger.save_dir == "runs"  # the config's, without default_root_dir
