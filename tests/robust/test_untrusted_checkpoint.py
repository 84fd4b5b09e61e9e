"""A checkpoint is data, not code: a .ckpt or pytorch_model.bin whose pickle calls a function while it loads is
refused with one line by every way in (analyze, export, --model.pretrained, --ckpt_path), and the function never
runs. The model of a .ckpt without our metadata is rebuilt from its hyper_parameters without the LightningModule."""

import ast
import inspect
import json
import pickle

import pytest
import torch

from lightning_mamba.cli import main
from lightning_mamba.models import ConfigError
from lightning_mamba.training import checkpoint_io
from lightning_mamba.training.checkpoint_io import AtomicCheckpointIO, load_model, model_config
from lightning_mamba.training.module import MambaLitModule

from .conftest import run_config


class WritesAFile:
    """Unpickling calls open(marker, "w"): harmless, but it shows that the file ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def crafted(tmp_path):
    """A .ckpt and a checkpoint directory whose pickles would create ``marker`` when loaded."""
    marker = tmp_path / "ran"
    ckpt = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"d_model": 32, "x": WritesAFile(marker)}}, ckpt)
    directory = tmp_path / "crafted_dir"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"d_model": 32, "n_layer": 1, "vocab_size": 64,
                                                       "ssm_cfg": {"layer": "Mamba2", "headdim": 16}}))
    torch.save({"backbone.embedding.weight": WritesAFile(marker)}, directory / "pytorch_model.bin")
    assert not marker.exists()
    return {"marker": marker, "ckpt": str(ckpt), "dir": str(directory)}


def assert_refused(message: str, crafted) -> None:
    assert "\n" not in message and "open while loading" in message and "refused" in message
    assert not crafted["marker"].exists(), "loading ran the checkpoint's code"


@pytest.mark.parametrize("kind", ["ckpt", "dir"])
def test_load_model_refuses_code(crafted, kind):
    with pytest.raises(ConfigError) as e:
        load_model(crafted[kind], backend="torch")
    assert_refused(str(e.value), crafted)


def test_pretrained_refuses_code(crafted):
    with pytest.raises(ConfigError) as e:
        MambaLitModule(pretrained=crafted["ckpt"], backend="torch")
    assert_refused(str(e.value), crafted)


@pytest.mark.parametrize("command", ["analyze", "export"])
def test_commands_refuse_code(crafted, tmp_path, capsys, command):
    with pytest.raises(SystemExit) as e:
        main([command, "--ckpt", crafted["ckpt"], "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{command}: error: ")
    assert_refused(err, crafted)


def test_resume_refuses_code(crafted, tmp_path, corpus, cache_dir):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", run_config(tmp_path / "run", corpus, cache_dir, 2), "--ckpt_path", crafted["ckpt"]])
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ")
    assert_refused(e.value.code, crafted)


def test_pretrained_refused_says_nothing_was_loaded(crafted, tmp_path, corpus, cache_dir, capsys):
    """fit --model.pretrained DIR whose pytorch_model.bin holds code: refused, and no "pretrained: loaded" line first
    (the line is printed once the weights are loaded)."""
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", run_config(tmp_path / "run", corpus, cache_dir, 2), "--model.pretrained",
              crafted["dir"], "--data.seq_len", "64"])
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ")
    assert_refused(e.value.code, crafted)
    assert "pretrained: loaded" not in capsys.readouterr().err


def test_model_from_hparams_without_the_lightning_module():
    """The flat settings -> MambaConfig mapping is the LightningModule's own, and checkpoint_io does not import it."""
    settings = {"d_model": 32, "n_layer": 2, "d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 16,
                "vocab_size": 50, "pad_vocab_size_multiple": 16, "dt_limit": [0.0, 0.5], "A_init_range": [1.0, 4.0]}
    assert model_config(**settings, lr=1.0) == MambaLitModule(**settings, backend="torch").config
    assert model_config() == MambaLitModule(backend="torch").config  # the same defaults
    imported = {(node.module or "") for node in ast.walk(ast.parse(inspect.getsource(checkpoint_io)))
                if isinstance(node, ast.ImportFrom)}
    assert "module" not in imported  # no circular import of training/module.py


def test_atomic_checkpoint_io_loads_weights_only(crafted):
    """Lightning's own load of --ckpt_path (through the plugin of configs/train.yaml) builds no objects either."""
    with pytest.raises(pickle.UnpicklingError):
        AtomicCheckpointIO().load_checkpoint(crafted["ckpt"], weights_only=False)
    assert not crafted["marker"].exists()
