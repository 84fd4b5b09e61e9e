"""Every shipped YAML validates against the CLI (litgpt-style), combined with the default run."""

import glob
import os

import pytest

from lightning_mamba.cli import lightning_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "configs", "train.yaml")


def group_files(group):
    return sorted(glob.glob(os.path.join(ROOT, "configs", group, "*.yaml")))


@pytest.mark.parametrize("group", ["model", "data", "trainer"])
def test_group_configs_validate(group, tmp_path):
    files = group_files(group)
    assert files, f"no configs under configs/{group}"
    for path in files:
        cli = lightning_cli(["--config", TRAIN, f"--{group}", path, "--data.cache_dir", str(tmp_path),
                             "--trainer.logger.init_args.save_dir", str(tmp_path)], run=False)
        assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None


def test_default_run_config_validates(tmp_path):
    cli = lightning_cli(["--config", TRAIN, "--trainer.logger.init_args.save_dir", str(tmp_path)], run=False)
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"LengthGeneralizationCallback", "StateStatsCallback", "TokenThroughputMonitor", "ModelCheckpoint"} <= names
