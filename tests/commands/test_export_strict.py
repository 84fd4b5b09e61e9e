"""`lightning-mamba export` writes strict JSON (no Infinity/NaN) and loads back as the same model, weights and config."""

import json
import math
import os
import subprocess

import pytest
import torch

from lightning_mamba.atomic import atomic_write_json
from lightning_mamba.cli import main
from lightning_mamba.data.tokenization import ByteTokenizer
from lightning_mamba.models import MambaConfig, MambaLM
from lightning_mamba.models.checkpoint import load_pretrained, official_config, save_pretrained
from lightning_mamba.models.config import MIXER_DEFAULTS, NO_DT_LIMIT
from lightning_mamba.training.checkpoint_io import load_model
from tests.models.test_checkpoint import IDS, logits, make_ckpt

SPEC = {"kind": "json", "json": ByteTokenizer().to_hf().to_str()}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def strict_load(path) -> object:
    """json.loads as a strict parser reads it: NaN, Infinity and -Infinity are errors."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")

    with open(path) as f:
        return json.loads(f.read(), parse_constant=refuse)


def assert_same_model(loaded: MambaLM, original: MambaLM) -> None:
    a, b = loaded.config, original.config
    assert a.mixer == b.mixer  # every mixer setting, dt_limit included, with its type (tuples stay tuples)
    assert {k: v for k, v in a.to_dict().items() if k != "ssm_cfg"} == {
        k: v for k, v in b.to_dict().items() if k != "ssm_cfg"}
    sa, sb = loaded.state_dict(), original.state_dict()
    assert list(sa) == list(sb)
    for key in sb:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    torch.testing.assert_close(logits(loaded, IDS), logits(original, IDS), rtol=0, atol=0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_ckpt(tmp_path_factory.mktemp("run"), SPEC)


def test_the_strict_parser_refuses_infinity(tmp_path):
    """The check the tests below rely on: what json.dumps writes by default is refused."""
    atomic_write_json(str(tmp_path / "loose.json"), {"dt_limit": list(NO_DT_LIMIT)})
    with pytest.raises(ValueError, match="Infinity"):
        strict_load(tmp_path / "loose.json")
    with pytest.raises(ValueError):  # allow_nan=False: refused before anything is written
        atomic_write_json(str(tmp_path / "strict.json"), {"x": math.nan}, allow_nan=False)
    assert not (tmp_path / "strict.json").exists()


def test_export_is_strict_json_and_round_trips(ckpt, tmp_path, capsys):
    path, module = ckpt
    out = tmp_path / "exported"
    with pytest.raises(SystemExit) as e:
        main(["export", "--ckpt", path, "--out", str(out)])
    assert e.value.code == 0, capsys.readouterr().err
    config = strict_load(out / "config.json")
    strict_load(out / "lightning_mamba.json")
    strict_load(out / "tokenizer.json")
    # like the official configs: ssm_cfg names the layer and what differs from the defaults, nothing else
    assert config["ssm_cfg"] == {"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 16}
    assert "dt_limit" not in (out / "config.json").read_text()
    original, _ = load_model(path, backend="torch")
    for loaded in (load_pretrained(str(out), backend="torch"), load_model(str(out), backend="torch")[0]):
        assert loaded.config.mixer["dt_limit"] == NO_DT_LIMIT
        assert_same_model(loaded, original)
        assert_same_model(loaded, module.model)


@pytest.mark.parametrize("ssm", [
    {"dt_limit": (0.0, 0.5), "A_init_range": (1.0, 4.0), "dt_min": 0.01, "dt_max": 0.05},
    {"dt_limit": (0.01, math.inf)},  # not the default, and infinite: written as the largest float, read back as inf
])
def test_settings_off_their_defaults_round_trip(tmp_path, ssm):
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=50, pad_vocab_size_multiple=16, ssm_cfg={
        "layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 16, **ssm}), backend="torch").eval()
    save_pretrained(model, str(tmp_path / "a"), extra={"seq_len": 64, "loss": math.inf})
    written = strict_load(tmp_path / "a" / "config.json")["ssm_cfg"]
    assert set(written) == {"layer", "d_state", "headdim", "chunk_size", *ssm}
    assert json.loads((tmp_path / "a" / "lightning_mamba.json").read_text())["seq_len"] == 64
    strict_load(tmp_path / "a" / "lightning_mamba.json")
    loaded = load_pretrained(str(tmp_path / "a"), backend="torch")
    assert loaded.config.mixer["dt_limit"] == ssm["dt_limit"]
    assert_same_model(loaded, model)
    # and again through the command: an exported directory exports to the same files
    with pytest.raises(SystemExit) as e:
        main(["export", "--ckpt", str(tmp_path / "a"), "--out", str(tmp_path / "b")])
    assert e.value.code == 0
    assert (tmp_path / "b" / "config.json").read_text() == (tmp_path / "a" / "config.json").read_text()
    assert_same_model(load_model(str(tmp_path / "b"), backend="torch")[0], model)


def test_official_config_leaves_every_default_out():
    cfg = MambaConfig(d_model=64, n_layer=1, vocab_size=16, ssm_cfg={"layer": "Mamba2", **MIXER_DEFAULTS})
    assert official_config(cfg)["ssm_cfg"] == {"layer": "Mamba2"}


def test_default_out_is_next_to_the_checkpoint(ckpt, tmp_path, capsys):
    path, module = ckpt
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(path, run / "last.ckpt")
    with pytest.raises(SystemExit) as e:
        main(["export", "--ckpt", str(run / "last.ckpt")])
    assert e.value.code == 0
    out = run / "exported"
    assert sorted(os.listdir(out)) == ["config.json", "lightning_mamba.json", "pytorch_model.bin", "tokenizer.json"]
    assert f"to {out}:" in capsys.readouterr().out
    assert_same_model(load_pretrained(str(out), backend="torch"), module.model)


@pytest.mark.parametrize("path", ["exported/state64_len512/config.json", "exported/config.json",
                                  "runs/x/version_0/checkpoints/analysis-window8/verdict.json",
                                  "exported/analysis-rri0.9999_0.75/verdict.json", "analysis-statenorm/curve.json"])
def test_outputs_are_git_ignored(path):
    if not os.path.isdir(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO)
    assert result.returncode == 0, f"{path} is not git-ignored"


def test_sources_are_not_git_ignored():
    if not os.path.isdir(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout")
    for path in ("lightning_mamba/analysis/new_module.py", "tests/analysis/test_new.py", "docs/results/x/README.md"):
        assert subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO).returncode == 1, path
