"""What counts as typed on the command line (as opposed to given by a config file); the checks made of it."""
import os

import pytest

from lightning_mamba.cli import main
from lightning_mamba.commands import sweep
from lightning_mamba.training.run_checks import config_files, typed_options

STUDY = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "study", "forget_threshold_cpu.yaml")


def test_typed_options_are_dotted_keys_whatever_the_spelling():
    argv = ["fit", "--config", "a.yaml", "--model.lr", "1e-3", "--model.init_args.chunk_size=32", "--data.seq_len=64",
            "-c", "b.yaml", "--model_overrides", "{a: 1}", "--", "value"]
    assert typed_options(argv) == {"config", "model.lr", "model.chunk_size", "data.seq_len", "model_overrides"}
    assert config_files(argv) == ["a.yaml", "b.yaml"]


def test_a_value_is_not_an_option():
    # values follow their option as separate tokens; only tokens that start with -- are options
    assert typed_options(["--model.d_state", "64", "model.lr"]) == {"model.d_state"}


def test_a_missing_config_file_is_named_not_taken_for_a_missing_logger(tmp_path, capsys):
    """A typo'd --config (or a study's base_config) beside a logger option: the run said "no logger class to take
    it: give a run config first", about a run config that was given; jsonargparse's "File does not exist" now."""
    missing = str(tmp_path / "trian.yaml")
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", missing, "--trainer.logger.init_args.name", "x"])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "File does not exist" in err and missing in err and "no logger class" not in err
    # the sweep gives every cell --trainer.logger.init_args.*: a missing base_config was the same wrong line (now
    # named as the base_config by the sweep itself, tests/commands/test_sweep_command.py)
    assert sweep.main(["--config", STUDY, "--base_config", f"[{missing}]", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"base_config {missing!r} is not a file" in err and "no logger class" not in err
