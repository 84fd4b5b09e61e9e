"""`lightning-mamba passkey` on a real tiny .ckpt and on official-layout directories: JSON, PNGs, one-line errors."""

import json
import os

import lightning as L
import pytest
import torch

from lightning_mamba.commands.passkey import main, parse_length
from lightning_mamba.data.corpus import default_corpus_documents
from lightning_mamba.data.datamodule import TextDataModule
from lightning_mamba.data.tokenization import BPETokenizer
from lightning_mamba.models.checkpoint import save_pretrained
from lightning_mamba.training.module import MambaLitModule

SEQ_LEN = 64


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """A 2-step fit of the real LightningModule on the byte tokenizer: the .ckpt records tokenizer and seq_len."""
    root = tmp_path_factory.mktemp("run")
    corpus = root / "corpus"
    corpus.mkdir()
    for d in range(6):
        (corpus / f"doc{d}.txt").write_text("".join(f"{d} line {i}: the cat sat on the mat.\n" for i in range(30)))
    torch.manual_seed(0)
    module = MambaLitModule(d_model=32, n_layer=2, d_state=16, headdim=16, chunk_size=64, vocab_size=257,
                            backend="torch", warmup_steps=1)
    data = TextDataModule(source=str(corpus), tokenizer="byte", seq_len=SEQ_LEN, batch_size=4, val_fraction=0.2,
                          cache_dir=str(root / "cache"))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=0, logger=False,
                        default_root_dir=str(root), enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    path = str(root / "tiny.ckpt")
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=False)["lightning_mamba"]["seq_len"] == SEQ_LEN
    return path


def test_default_lengths_on_a_lightning_checkpoint(ckpt, capsys):
    assert main(["--ckpt", ckpt, "--n_depths", "2", "--n_samples", "2", "--piece_len", "256"]) == 0
    out = os.path.join(os.path.dirname(ckpt), "passkey")
    r = json.load(open(os.path.join(out, "passkey.json")))
    assert r["seq_len"] == SEQ_LEN and r["tokenizer"] == "byte"
    assert r["lengths"] == [256, 512, 1024]  # 4, 8, 16 x T_train; 0.5-2 x are shorter than the template
    assert r["depths"] == [0.25, 0.75] and len(r["accuracy"]) == 2 and len(r["accuracy_by_length"]) == 3
    assert "t_recall" in r and r["samples_per_cell"] == 2
    assert {"passkey_heatmap.png", "passkey_vs_length.png", "passkey.json"} <= set(os.listdir(out))
    printed = capsys.readouterr()
    assert "T_recall" in printed.out and "shorter than the template" in printed.err


def test_lengths_depths_and_out(ckpt, tmp_path):
    out = tmp_path / "pk"
    assert main(["--ckpt", ckpt, "--lengths", "200", "1K", "--depths", "0", "0.5", "1", "--n_samples", "1",
                 "--out", str(out), "--seed", "3",
                 "--template.needle", "The pass key is {key}. Remember it. {key} is the pass key.\n"]) == 0
    r = json.loads((out / "passkey.json").read_text())
    assert r["template"]["needle"].startswith("The pass key is {key}")
    assert r["lengths"] == [200, 1024] and r["depths"] == [0.0, 0.5, 1.0] and r["seed"] == 3
    assert len(r["keys"]) == 3 and all(len(k) == 5 for row in r["keys"] for cell in row for k in cell)


def test_template_from_a_file(ckpt, tmp_path):
    """--template FILE, as configs/passkey/code.yaml documents it (jsonargparse adds the file's __path__)."""
    template = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "passkey", "code.yaml")
    out = tmp_path / "pk"
    assert main(["--ckpt", ckpt, "--template", template, "--lengths", "300", "--n_depths", "1", "--n_samples", "1",
                 "--out", str(out)]) == 0
    r = json.loads((out / "passkey.json").read_text())
    assert r["template"]["needle"].startswith("PASSKEY = {key}") and r["lengths"] == [300]


def test_official_layout_directory_with_its_tokenizer_json(tmp_path, capsys):
    """As an official Mamba-2 download: config.json + pytorch_model.bin + tokenizer.json (a byte-level BPE like
    GPT-NeoX's), no training length recorded."""
    from tests.tiny import tiny_lm

    bpe = BPETokenizer.train([d[:10_000] for d in default_corpus_documents()[::6][:10]], 400)
    model = tiny_lm(vocab_size=bpe.vocab_size)
    directory = tmp_path / "mamba2-official"
    save_pretrained(model, str(directory), tokenizer_spec=bpe.to_spec())
    os.remove(directory / "lightning_mamba.json")  # the official release has only config, weights, tokenizer
    assert main(["--ckpt", str(directory), "--n_samples", "1"]) == 2
    err = capsys.readouterr().err
    assert "--lengths" in err and len(err.strip().splitlines()) == 1
    assert main(["--ckpt", str(directory), "--lengths", "128", "512", "--n_depths", "2", "--n_samples", "2",
                 "--seq_len", "128"]) == 0
    r = json.loads((directory / "passkey" / "passkey.json").read_text())
    assert r["lengths"] == [128, 512] and r["seq_len"] == 128 and r["canonical_tokenization"]
    tok_file = tmp_path / "tok.json"
    bpe.save(str(tok_file))
    assert main(["--ckpt", str(directory), "--lengths", "300", "--tokenizer", str(tok_file), "--n_samples", "1",
                 "--out", str(tmp_path / "o2")]) == 0


@pytest.mark.parametrize("args, words", [
    (["--lengths", "10"], ["shorter than the template"]),
    (["--lengths", "4x"], ["4x", "4K"]),
    (["--lengths", "inf"], ["'inf' must be a positive whole number of tokens"]),  # was an OverflowError traceback
    (["--lengths", "1e400"], ["'1e400' must be a positive whole number of tokens"]),
    (["--lengths", "nan"], ["'nan' must be a positive whole number of tokens"]),
    (["--lengths", "300", "--depths", "1.5"], ["outside [0, 1]"]),
    (["--lengths", "300", "--n_samples", "0"], ["--n_samples"]),
    (["--lengths", "300", "--template.needle", "no key here"], ["{key}"]),
])
def test_bad_input_is_a_one_line_error(ckpt, capsys, args, words):
    assert main(["--ckpt", ckpt, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("passkey: error:") and len(err.splitlines()) == 1
    for w in words:
        assert w in err


def test_missing_checkpoint_and_length_units(tmp_path, capsys):
    assert main(["--ckpt", str(tmp_path / "nope.ckpt"), "--lengths", "300"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert [parse_length(x) for x in ("4096", "4K", "1.5k", "1M")] == [4096, 4096, 1536, 2**20]
