"""`lightning-mamba export`: a real tiny .ckpt -> the official layout, loadable with identical logits."""

import json
import os

import pytest
import torch

from lightning_mamba.cli import main
from lightning_mamba.data.tokenization import ByteTokenizer
from lightning_mamba.models.checkpoint import load_pretrained, load_tokenizer_spec
from lightning_mamba.training.checkpoint_io import load_model
from tests.models.test_checkpoint import IDS, logits, make_ckpt

SPEC = {"kind": "json", "json": ByteTokenizer().to_hf().to_str()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_ckpt(tmp_path_factory.mktemp("run"), SPEC)


def test_export_writes_the_official_layout(ckpt, tmp_path, capsys):
    path, module = ckpt
    out = tmp_path / "export"
    with pytest.raises(SystemExit) as e:
        main(["export", "--ckpt", path, "--out", str(out)])
    assert e.value.code == 0
    assert sorted(os.listdir(out)) == ["config.json", "lightning_mamba.json", "pytorch_model.bin", "tokenizer.json"]
    assert "config.json" in capsys.readouterr().out
    model = load_pretrained(str(out), backend="torch")
    torch.testing.assert_close(logits(model, IDS), logits(module.model, IDS), rtol=0, atol=0)
    assert load_tokenizer_spec(str(out)) == SPEC
    assert json.loads((out / "lightning_mamba.json").read_text())["seq_len"] == 16
    _, meta = load_model(str(out), backend="torch")  # what `analyze` gets from the exported directory
    assert meta["seq_len"] == 16 and meta["tokenizer"] == SPEC


def test_export_in_bfloat16(ckpt, tmp_path):
    path, module = ckpt
    with pytest.raises(SystemExit) as e:
        main(["export", "--ckpt", path, "--out", str(tmp_path), "--dtype", "bfloat16"])
    assert e.value.code == 0
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.bfloat16} and "lm_head.weight" in state
    model = load_pretrained(str(tmp_path), backend="torch")
    torch.testing.assert_close(logits(model, IDS), logits(module.model, IDS), rtol=3e-2, atol=3e-2)


def test_missing_ckpt_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "out")])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert "nope.ckpt does not exist" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
