"""Every shipped YAML validates against the CLI (litgpt-style), combined with the default run."""

import glob
import os

import pytest
import torch
import yaml

from lightning_mamba.cli import MambaCLI, lightning_cli, main
from lightning_mamba.commands import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "configs", "train.yaml")


def group_files(group):
    return sorted(glob.glob(os.path.join(ROOT, "configs", group, "*.yaml")))


def needs_gpu(path) -> bool:
    with open(path) as f:
        return (yaml.safe_load(f) or {}).get("accelerator") in ("gpu", "cuda")


@pytest.mark.parametrize("group", ["model", "data", "trainer"])
def test_group_configs_validate(group, tmp_path, monkeypatch):
    files = group_files(group)
    assert files, f"no configs under configs/{group}"
    for path in files:
        args = ["--config", TRAIN, f"--{group}", path, "--data.cache_dir", str(tmp_path),
                "--trainer.logger.init_args.save_dir", str(tmp_path)]
        if group == "trainer" and needs_gpu(path) and not torch.cuda.is_available():
            # a GPU-only config (ddp, fsdp) on a CPU machine: it parses, and its classes (strategy, ...) build;
            # only the Trainer itself needs the GPU
            with monkeypatch.context() as m:
                m.setattr(MambaCLI, "instantiate_classes", lambda self: None)
                cli = lightning_cli(args, run=False)
            init = cli.parser.instantiate(cli.config)
            assert init.trainer.accelerator in ("gpu", "cuda") and init.trainer.strategy is not None
            continue
        cli = lightning_cli(args, run=False)
        assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None


def test_default_run_config_validates(tmp_path):
    cli = lightning_cli(["--config", TRAIN, "--trainer.logger.init_args.save_dir", str(tmp_path)], run=False)
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"LengthGeneralizationCallback", "StateStatsCallback", "TokenThroughputMonitor", "ModelCheckpoint"} <= names


# configs/experiment/ holds overlays of a whole `fit` run; configs/study/ holds the files `sweep --config` reads.
# Each folder's files parse with their own reader and are refused by the other one.
@pytest.mark.parametrize("path", group_files("experiment"), ids=os.path.basename)
def test_experiment_overlays_are_fit_configs(path, tmp_path, capsys):
    cli = lightning_cli(["--config", TRAIN, "--config", path, "--trainer.logger", "false"], run=False)
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None
    with pytest.raises(SystemExit):
        sweep.build_parser().parse_args(["--config", path])
    with pytest.raises(SystemExit):
        sweep.parse_args(["--config", path])
    assert f"error: --config {path} is a run config, read by `lightning-mamba fit --config`" in capsys.readouterr().err


@pytest.mark.parametrize("path", group_files("study"), ids=os.path.basename)
def test_study_files_are_sweep_configs(path, capsys):
    study = sweep.study_from(sweep.build_parser().parse_args(["--config", path]))
    study.validate()
    for base in study.base_config:  # repo-relative, as `make sweep` runs from the repo root
        assert os.path.isfile(os.path.join(ROOT, base)), base
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", TRAIN, "--config", path, "--trainer.logger", "false"])
    assert e.value.code == f"error: --config {path} is a study file: run it with `lightning-mamba sweep --config {path}`"


def test_each_config_folder_has_files():
    assert group_files("experiment") and group_files("study")


def test_the_regime_evaluates_to_at_least_32k_tokens():
    """The failing regime's floor on the evaluated length, in its training overlay (the callback) and its studies;
    the English studies keep 64 x LEN (or their eval_multiple)."""
    overlay = os.path.join(ROOT, "configs", "experiment", "regime.yaml")
    cli = lightning_cli(["--config", TRAIN, "--config", overlay, "--trainer.logger", "false"], run=False)
    (lengthgen,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "LengthGeneralizationCallback"]
    assert lengthgen.min_length == 32768 and lengthgen.eval_length(32) == 32768 and lengthgen.eval_length(1024) == 65536
    for path in group_files("study"):
        study = sweep.study_from(sweep.build_parser().parse_args(["--config", path]))
        regime = os.path.basename(path).startswith("regime")
        assert study.eval_min_tokens == (32768 if regime else None), path


def test_two_overlays_that_both_add_a_callback_are_refused_in_one_line(tmp_path, capsys):
    """passkey.yaml and passkey_keep.yaml each append a PasskeyEvalCallback (trainer.callbacks+): stacked, or with a
    --trainer.callbacks+= of a callback train.yaml already has, Lightning stopped with a RuntimeError traceback when
    the Trainer was built. One line now, and no run directory."""
    experiment = os.path.join(ROOT, "configs", "experiment")
    stacked = ["--config", os.path.join(experiment, "passkey.yaml"), "--config", os.path.join(experiment, "passkey_keep.yaml")]
    appended = ["--trainer.callbacks+=LengthGeneralizationCallback"]
    for extra, name in ((stacked, "PasskeyEvalCallback"), (appended, "LengthGeneralizationCallback")):
        runs = tmp_path / name
        with pytest.raises(SystemExit) as e:
            main(["fit", "--config", TRAIN, *extra, "--trainer.logger.init_args.save_dir", str(runs),
                  "--data.cache_dir", str(tmp_path / "cache"), "--data.tokenizer", "byte"])
        assert str(e.value.code).startswith(f"error: trainer.callbacks holds two {name} ")
        assert "\n" not in str(e.value.code) and "keep one" in str(e.value.code)
        assert not runs.exists()


def test_a_logger_option_without_a_logger_class_says_where_the_class_comes_from(capsys):
    """`fit --trainer.logger.init_args.name foo` without a config: jsonargparse said "trainer.logger: expected a bool
    or null, got NestedArg(key='name', val='foo')". One line now, naming the option typed; with the run config
    (whose logger is TensorBoard) or the class typed, the option is taken."""
    for option in (["--trainer.logger.init_args.name", "foo"], ["--trainer.logger.name=foo"]):
        with pytest.raises(SystemExit) as e:
            main(["fit", *option])
        assert str(e.value.code) == (f"error: {option[0].split('=')[0]}: no logger class to take it: give a run "
                                     "config first (--config configs/train.yaml, whose logger is TensorBoard) or the "
                                     "class (--trainer.logger TensorBoardLogger)")
    for given in (["--config", TRAIN], ["--trainer.logger", "TensorBoardLogger"]):
        with pytest.raises(SystemExit) as e:
            main(["fit", *given, "--trainer.logger.init_args.name", "foo", "--print_config"])
        logger = yaml.safe_load(capsys.readouterr().out)["trainer"]["logger"]
        assert e.value.code in (0, None) and logger["init_args"]["name"] == "foo", logger


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_a_config_file_of_another_kind_is_named_with_where_it_goes(subcommand):
    """`fit --config` of a group file, a passkey template or an overlay without the run under it: jsonargparse said
    "does not accept option 'd_model'" or "trainer.logger: expected a bool or null, got {'init_args': ...}" (make
    train CONFIG=configs/experiment/passkey.yaml). One line now, with the option or the stacking that takes it."""
    cases = {
        "model/small.yaml": "holds model settings only: give it as --model {p}, after a whole run config",
        "data/byte.yaml": "holds data settings only: give it as --data {p}",
        "trainer/cpu.yaml": "holds trainer settings only: give it as --trainer {p}",
        "passkey/code.yaml": "is a passkey template: give it as --data.passkey_template {p}",
        "experiment/passkey.yaml": "is an overlay (its trainer.logger names no class): give it after a whole run config, "
                                   "e.g. --config configs/train.yaml --config {p}",
    }
    for name, says in cases.items():
        path = os.path.join(ROOT, "configs", name)
        with pytest.raises(SystemExit) as e:
            main([subcommand, "--config", path])
        assert str(e.value.code).startswith(f"error: --config {path} " + says.format(p=path)), e.value.code
        assert "\n" not in str(e.value.code)
