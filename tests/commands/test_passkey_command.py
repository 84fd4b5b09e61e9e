"""`lightning-mamba passkey` on a real tiny .ckpt and on official-layout directories: JSON, PNGs, one-line errors; the
prompt a passkey run trained with is the default."""

import dataclasses
import json
import os

import lightning as L
import pytest
import torch

from lightning_mamba.commands.export import export
from lightning_mamba.commands.passkey import main, parse_length
from lightning_mamba.data.corpus import default_corpus_documents
from lightning_mamba.data.datamodule import TextDataModule
from lightning_mamba.data.passkey import PasskeyDataModule, PasskeyGenerator, PasskeyTemplate
from lightning_mamba.data.tokenization import BPETokenizer, ByteTokenizer
from lightning_mamba.models.checkpoint import save_pretrained
from lightning_mamba.training.module import MambaLitModule

SEQ_LEN = 64


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """A 2-step fit of the real LightningModule on the byte tokenizer: the .ckpt records tokenizer and seq_len."""
    path = fit_tiny(tmp_path_factory.mktemp("run"), TextDataModule)
    assert torch.load(path, weights_only=False)["lightning_mamba"]["seq_len"] == SEQ_LEN
    return path


# the prompt of the passkey run below: not the paper's, with 6-digit keys
TRAINED_TEMPLATE = PasskeyTemplate(instruction="Find the code.\n", filler="x y z.\n", needle="CODE {key}.\n",
                                   question="CODE?", answer=" {key}")
TRAINED_DIGITS = 6


@pytest.fixture(scope="module")
def passkey_ckpt(tmp_path_factory) -> str:
    """As ``ckpt``, on passkey + text data with TRAINED_TEMPLATE and TRAINED_DIGITS."""
    return fit_tiny(tmp_path_factory.mktemp("passkey_run"), PasskeyDataModule, passkey_template=TRAINED_TEMPLATE,
                    passkey_digits=TRAINED_DIGITS)


def fit_tiny(root, data_class, **data_settings) -> str:
    corpus = root / "corpus"
    corpus.mkdir()
    for d in range(6):
        (corpus / f"doc{d}.txt").write_text("".join(f"{d} line {i}: the cat sat on the mat.\n" for i in range(30)))
    torch.manual_seed(0)
    module = MambaLitModule(d_model=32, n_layer=2, d_state=16, headdim=16, chunk_size=64, vocab_size=257,
                            backend="torch", warmup_steps=1)
    data = data_class(source=str(corpus), tokenizer="byte", seq_len=SEQ_LEN, batch_size=4, val_fraction=0.2,
                      cache_dir=str(root / "cache"), **data_settings)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=0, logger=False,
                        default_root_dir=str(root), enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    path = str(root / "tiny.ckpt")
    trainer.save_checkpoint(path)
    return path


def test_default_lengths_on_a_lightning_checkpoint(ckpt, capsys):
    assert main(["--ckpt", ckpt, "--n_depths", "2", "--n_samples", "2", "--piece_len", "256"]) == 0
    out = os.path.join(os.path.dirname(ckpt), "passkey")
    r = json.load(open(os.path.join(out, "passkey.json")))
    assert r["seq_len"] == SEQ_LEN and r["tokenizer"] == "byte"
    assert r["template_source"] == "default" and r["digits"] == 5  # a text-only run records no passkey prompt
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


def keys_of(r: dict) -> list[str]:
    return [k for row in r["keys"] for cell in row for k in cell]


def test_the_prompt_a_passkey_run_trained_with_is_the_default(passkey_ckpt, tmp_path, capsys):
    """It was the paper's template with 5-digit keys, silently, whatever the model trained on."""
    out = tmp_path / "pk"
    assert main(["--ckpt", passkey_ckpt, "--lengths", "256", "512", "--n_depths", "2", "--n_samples", "2",
                 "--out", str(out)]) == 0
    r = json.loads((out / "passkey.json").read_text())
    assert len(keys_of(r)) == 8 and all(len(k) == 6 and k.isdigit() for k in keys_of(r))
    assert r["template"] == dataclasses.asdict(TRAINED_TEMPLATE)
    assert r["template_tokens"] == PasskeyGenerator(ByteTokenizer(), TRAINED_TEMPLATE, TRAINED_DIGITS).min_length
    assert (r["template_source"], r["digits"], r["digits_source"]) == ("checkpoint", TRAINED_DIGITS, "checkpoint")
    notes = [line for line in capsys.readouterr().err.splitlines() if "this model trained with" in line]
    assert notes == ["note: using the passkey template and 6-digit keys this model trained with "
                     "(data.passkey_template, data.passkey_digits); pass --template or --digits to override"]


CODE_TEMPLATE = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "passkey", "code.yaml")


@pytest.mark.parametrize("args, needle, digits, sources", [
    (["--digits", "4"], TRAINED_TEMPLATE.needle, 4, ("checkpoint", "--digits")),
    (["--template", CODE_TEMPLATE], "PASSKEY = {key}", 6, ("--template", "checkpoint")),
    # given fields over the paper's (not over the checkpoint's); an explicit 5 wins over the checkpoint's 6
    (["--template.needle", "The pass key is {key}.\n", "--digits", "5"], "The pass key is {key}.", 5,
     ("--template", "--digits")),
])
def test_template_and_digits_on_the_command_line_win(passkey_ckpt, tmp_path, capsys, args, needle, digits, sources):
    out = tmp_path / "pk"
    assert main(["--ckpt", passkey_ckpt, "--lengths", "300", "--n_depths", "1", "--n_samples", "2", "--out", str(out),
                 *args]) == 0
    r = json.loads((out / "passkey.json").read_text())
    assert all(len(k) == digits for k in keys_of(r)) and r["template"]["needle"].startswith(needle)
    if sources[0] == "--template":
        assert r["template"]["question"] != TRAINED_TEMPLATE.question  # not a field of the checkpoint's
    assert r["digits"] == digits and (r["template_source"], r["digits_source"]) == sources
    assert ("this model trained with" in capsys.readouterr().err) == ("checkpoint" in sources)


def test_an_exported_passkey_run_keeps_its_prompt(passkey_ckpt, tmp_path, capsys):
    directory = tmp_path / "exported"
    export(passkey_ckpt, str(directory))
    assert main(["--ckpt", str(directory), "--lengths", "256", "--n_depths", "1", "--n_samples", "2"]) == 0
    r = json.loads((directory / "passkey" / "passkey.json").read_text())
    assert r["template"] == dataclasses.asdict(TRAINED_TEMPLATE) and all(len(k) == 6 for k in keys_of(r))
    meta_file = directory / "lightning_mamba.json"  # edited by hand: one line, not a traceback
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "passkey": {"template": "CODE"}}))
    capsys.readouterr()
    assert main(["--ckpt", str(directory), "--lengths", "256"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("passkey: error: the checkpoint's passkey record") and len(err.splitlines()) == 1
    assert "--template and --digits" in err


def test_digits_below_one_is_a_one_line_error_before_loading(tmp_path, capsys):
    assert main(["--ckpt", str(tmp_path / "nope.ckpt"), "--digits", "0"]) == 2  # not "--ckpt ... does not exist"
    err = capsys.readouterr().err.strip()
    assert err == "passkey: error: --digits must be >= 1 (got 0)"
