"""The bad-input matrix, driven through `lightning-mamba` as a user would: each case ends with one line that
names the setting and the fix, no traceback, and nothing already on disk (checkpoint, corpus, caches) lost.

Checkpoint cases go through ``MambaCLI._parse_ckpt_path`` (``checkpoint_io.check_resume`` before LightningCLI
replaces the model settings by the checkpoint's); Lightning's Trainer errors (MisconfigurationException) are
printed by ``cli.main`` as one line like the package's UserErrors (``cli.user_error``)."""

import glob
import hashlib
import os

import pytest
import torch

from lightning_mamba.cli import main
from lightning_mamba.models import ConfigError
from lightning_mamba.training.module import MambaLitModule

from .conftest import run_config, write_corpus


def digest(paths) -> dict[str, str]:
    return {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in sorted(paths) if os.path.isfile(p)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, corpus, cache_dir):
    """A finished tiny run (its last.ckpt), a config for another, and bad inputs of every kind on disk."""
    root = tmp_path_factory.mktemp("bad")
    main(["fit", "--config", run_config(root / "done", corpus, cache_dir, 2)])
    bad = root / "inputs"
    (bad / "empty").mkdir(parents=True)
    (bad / "empty" / "a.txt").write_text("  \n")
    (bad / "empty" / "b.txt").write_text("")
    (bad / "no_text_files").mkdir()
    (bad / "no_text_files" / "table.csv").write_text("a,b\n")
    (bad / "broken_parquet").mkdir()
    (bad / "broken_parquet" / "a.parquet").write_bytes(b"not parquet at all")
    (bad / "no_text_field").mkdir()
    (bad / "no_text_field" / "a.jsonl").write_text('{"body": "one"}\n{"body": "two"}\n')
    (bad / "one_doc.txt").write_text("a single document")
    (bad / "binary.yaml").write_bytes(b"\x00\x01\x02\xc3\x28" + bytes(range(256)))
    (bad / "garbage.ckpt").write_bytes(b"this is not a checkpoint" * 10)
    (bad / "truncated.ckpt").write_bytes((root / "done" / "ckpt" / "last.ckpt").read_bytes()[:5000])
    write_corpus(bad / "non_utf8", n_docs=3)
    for i in range(3):
        with open(bad / "non_utf8" / f"doc{i:02d}.txt", "ab") as f:
            f.write(b"caf\xe9 \xff\xfe latin-1 bytes\n" * 100)
    return {"root": root, "ckpt": str(root / "done" / "ckpt" / "last.ckpt"), "bad": bad, "corpus": corpus,
            "cache_dir": cache_dir, "config": run_config(root / "next", corpus, cache_dir, 2)}


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit with an error: return the message (the exit's, else stderr's error line)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if isinstance(e.value.code, str):
        assert "\n" not in e.value.code and "Traceback" not in e.value.code
        return e.value.code
    assert e.value.code != 0
    lines = [line for line in err.splitlines() if "error:" in line]  # argument parser: "error: ...", then a hint
    assert lines, err
    assert "usage:" not in err and len(err[err.index(lines[0]):].strip().splitlines()) <= 2, err  # no usage dump
    return err[err.index(lines[0]):]


B = "{bad}"
CASES = [  # (id, arguments after `fit --config CONFIG`, fragment of the message)
    # model group: types and ranges
    ("model-type", ["--model.d_state", "abc"], "error: model.d_state: expected an int, got 'abc'\n"),
    ("model-lr-inf", ["--model.lr", "inf"], "model.lr: expected a float, got 'inf'"),
    ("model-lr-overflow", ["--model.lr", "1e400"], "model.lr must be a finite number > 0 (got inf)"),
    ("model-unknown-key", ["--model.dstate", "3"], "unrecognized arguments: --model.dstate"),
    ("model-abbreviated-key", ["--model.d_stat", "3"], "unrecognized arguments: --model.d_stat"),  # not d_state
    ("model-lr", ["--model.lr", "-1"], "model.lr must be > 0 (got -1.0)"),
    ("model-schedule", ["--model.schedule", "step"], "model.schedule='step' is unknown: use one of wsd"),
    ("model-betas", ["--model.betas", "[2, 0.9]"], "model.betas must be two numbers in [0, 1)"),
    ("model-warmup", ["--model.warmup_steps", "-1"], "model.warmup_steps must be >= 0"),
    ("model-n_layer", ["--model.n_layer", "0"], "n_layer must be >= 1"),
    ("model-headdim", ["--model.headdim", "24"], "headdim=24 must divide"),
    ("unknown-backend", ["--model.backend", "tpu"], "unknown backend 'tpu': use one of auto, torch, triton"),
    ("cuda-graph-on-cpu", ["--model.cuda_graph", "true"], "model.cuda_graph needs a CUDA device"),
    ("cuda-graph-with-noise", ["--model.cuda_graph", "true", "--model.initial_state", "noise"],
     "model.cuda_graph needs model.initial_state zero"),
    ("cuda-graph-update-alone", ["--model.cuda_graph_update", "true"],
     "model.cuda_graph_update replays the update after the loss's graph: it needs model.cuda_graph true"),
    ("cuda-graph-update-value-clip", ["--model.cuda_graph", "true", "--model.cuda_graph_update", "true",
                                      "--trainer.gradient_clip_algorithm", "value"],
     "model.cuda_graph_update clips by norm in its graph (got --trainer.gradient_clip_algorithm value): use norm"),
    # data group: types and ranges
    ("data-type", ["--data.batch_size", "many"], "error: data.batch_size: expected an int, got 'many'\n"),
    ("data-seq_len", ["--data.seq_len", "1"], "data.seq_len must be >= 2 (got 1)"),
    ("data-batch_size", ["--data.batch_size", "0"], "data.batch_size must be >= 1 (got 0)"),
    ("data-val_fraction", ["--data.val_fraction", "1.5"], "data.val_fraction must be between 0 and 1"),
    ("data-num_workers", ["--data.num_workers", "-1"], "data.num_workers must be >= 0"),
    ("data-tokenizer", ["--data.tokenizer", "wordpiece"], "unknown tokenizer 'wordpiece': use 'byte', 'bpe'"),
    ("data-tokenizer-file", ["--data.tokenizer", "/nonexistent/tokenizer.json"],
     "data.tokenizer /nonexistent/tokenizer.json does not exist"),
    # trainer group: types and ranges
    ("trainer-type", ["--trainer.max_steps", "x"], "trainer.max_steps"),
    ("trainer-choice", ["--trainer.precision", "13"], "trainer.precision"),
    ("trainer-range", ["--trainer.max_steps", "-5"], "max_steps` must be a non-negative integer or -1"),
    ("accelerator-missing-package", ["--trainer.accelerator", "tpu"], "needed by the chosen trainer.accelerator"),
    ("precision-missing-package", ["--trainer.precision", "transformer-engine"],
     "transformer_engine>=0.11.0' not met. HINT: Try running `pip install -U 'transformer_engine>=0.11.0'` (needed by "
     "the chosen trainer.accelerator, trainer.strategy or trainer.precision)"),
    ("accelerator-unknown", ["--trainer.accelerator", "banana"],
     "trainer.accelerator='banana' is unknown: use one of auto, gpu, cpu"),
    ("strategy-unknown", ["--trainer.strategy", "banana"], "trainer.strategy='banana' is unknown: use one of auto"),
    ("val-check-zero", ["--trainer.val_check_interval", "0"], "trainer.val_check_interval must be > 0 (got 0)"),
    ("accumulate-zero", ["--trainer.accumulate_grad_batches", "0"],
     "trainer.accumulate_grad_batches must be an integer >= 1 (got 0)"),
    ("nan-guard-mode", ["--nan_guard.on_nonfinite", "foo"], "nan_guard.on_nonfinite='foo' is unknown: use 'stop' or"),
    ("binary-config", ["--config", B + "/binary.yaml"], "binary.yaml is not a text file (byte 0xc3 at offset 3 is not "
                                                        "UTF-8): give a YAML config file"),
    ("missing-config", ["--config", "/nonexistent/run.yaml"], "/nonexistent/run.yaml"),
    # files and documents
    ("missing-source", ["--data.source", "/nonexistent/texts"], "data.source /nonexistent/texts does not exist"),
    ("empty-documents", ["--data.source", B + "/empty"], "holds no non-empty documents"),
    ("no-text-files", ["--data.source", B + "/no_text_files"], "no .txt/.text/.md/.jsonl/.json/.parquet files"),
    ("unreadable-parquet", ["--data.source", B + "/broken_parquet"], "cannot read its parquet files"),
    ("no-text-field", ["--data.source", B + "/no_text_field"], "has no 'text' field (it has: body): set "
                                                              "data.text_field"),
    ("one-document", ["--data.source", B + "/one_doc.txt"], "needs at least 2"),
    ("len-larger-than-corpus", ["--data.seq_len", "100000"], "data.seq_len=100000 is larger than the training split"),
    ("batch-larger-than-corpus", ["--data.batch_size", "5000"], "data.batch_size=5000 is larger than the"),
    # checkpoints
    ("tokenizer-vs-checkpoint", ["--ckpt_path", "{ckpt}", "--trainer.max_steps", "4", "--data.tokenizer", "bpe",
                                 "--data.bpe_vocab_size", "300"],
     # told from the settings, before a BPE is trained (checkpoint_io.check_tokenizer_kind)
     "was trained with the byte tokenizer, but data.tokenizer is bpe: set --data.tokenizer byte"),
    ("shape-vs-checkpoint", ["--ckpt_path", "{ckpt}", "--model.d_state", "32"],
     "was saved for a different model shape: model.d_state=16 there, 32 here"),
    ("missing-checkpoint", ["--ckpt_path", "/nonexistent/last.ckpt"], "checkpoint /nonexistent/last.ckpt does not "
                                                                       "exist"),
    ("directory-checkpoint", ["--ckpt_path", B + "/no_text_files"],  # was "does not exist", of a folder that does
     "no_text_files is a directory: --ckpt_path takes a .ckpt written by a run"),
    ("garbage-checkpoint", ["--ckpt_path", B + "/garbage.ckpt"], "garbage.ckpt cannot be read"),
    ("truncated-checkpoint", ["--ckpt_path", B + "/truncated.ckpt"], "truncated.ckpt cannot be read"),
    ("steps-zero", ["--trainer.max_steps", "0"], "trainer.max_steps=0 trains nothing: give a number of steps > 0"),
    ("steps-reached", ["--ckpt_path", "{ckpt}"], "is at step 2, so trainer.max_steps=2 trains nothing more: give "
                                                 "more than 2"),
]


@pytest.mark.parametrize("args,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(setup, capsys, args, fragment):
    args = [a.replace(B, str(setup["bad"])).replace("{ckpt}", setup["ckpt"]) for a in args]
    kept = digest([setup["ckpt"], *glob.glob(os.path.join(setup["corpus"], "*")),
                   *glob.glob(os.path.join(setup["cache_dir"], "*"))])
    runs = os.path.join(setup["root"], "next", "runs", "tiny", "*")
    folders = sorted(glob.glob(runs))
    message = one_line_error(capsys, ["fit", "--config", setup["config"], *args])
    assert fragment in message
    assert digest(kept) == kept  # nothing lost or rewritten
    assert not glob.glob(os.path.join(setup["cache_dir"], "*.tmp"))
    assert sorted(glob.glob(runs)) == folders  # no run directory left behind (e.g. by a refusal when the data sets up)


def test_val_check_interval_zero_makes_no_run_directory(setup, capsys, tmp_path):
    """Refused with the settings, not by a division by zero in Lightning's loop after the logger made its folder."""
    config = run_config(tmp_path, setup["corpus"], setup["cache_dir"], 2)
    assert "val_check_interval" in one_line_error(capsys, ["fit", "--config", config, "--trainer.val_check_interval",
                                                           "0"])
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "ckpt")


def set_field(path: str, keys: str, value) -> None:
    """Hand-edit the field at dotted ``keys`` of the checkpoint at ``path``."""
    ckpt = torch.load(path, weights_only=True)
    *outer, last = keys.split(".")
    d = ckpt
    for key in outer:
        d = d[key]
    d[last] = value
    torch.save(ckpt, path)


DAMAGED = [  # (field, value, fragment of the one line)
    ("lightning_mamba.tokenizer", {"kind": "json", "json": "zz"},
     "lightning_mamba.tokenizer: tokenizer tokenizer.json cannot be read as a tokenizer (expected value at line 1"),
    ("TextDataModule.train_sampler.consumed", "abc", "TextDataModule.train_sampler.consumed is 'abc', not a whole"),
    ("lr_schedule.total_steps", "x", "lr_schedule.total_steps is 'x', not a whole number >= 0"),
    ("hyper_parameters", "oops", "hyper_parameters is 'oops', not a dict"),
]


@pytest.mark.parametrize("field,value,fragment", DAMAGED, ids=[d[0] for d in DAMAGED])
def test_damaged_checkpoint_field_is_one_line(setup, capsys, tmp_path, field, value, fragment):
    path = str(tmp_path / "edited.ckpt")
    open(path, "wb").write(open(setup["ckpt"], "rb").read())
    set_field(path, field, value)
    message = one_line_error(capsys, ["fit", "--config", setup["config"], "--ckpt_path", path])
    assert f"checkpoint {path} is damaged: {fragment}" in message
    # read as a model (analyze, export, --model.pretrained): the same line
    with pytest.raises(SystemExit):
        main(["analyze", "--ckpt", path, "--out", str(tmp_path / "analysis"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"checkpoint {path} is damaged: {fragment}" in err[0], err


def fit_in_python(setup, d_state: int, ckpt_path: str) -> None:
    """Trainer.fit(ckpt_path=) of the tiny run's model at ``d_state``, without the CLI."""
    import lightning as L

    from lightning_mamba.data import TextDataModule

    dm = TextDataModule(source=setup["corpus"], tokenizer="byte", seq_len=64, batch_size=4,
                        cache_dir=setup["cache_dir"])
    model = MambaLitModule(d_model=32, n_layer=2, d_state=d_state, headdim=16, chunk_size=32, vocab_size=257,
                           backend="torch")
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, dm, ckpt_path=ckpt_path)


def test_damaged_checkpoint_in_python_is_one_line(setup, tmp_path):
    """Trainer.fit(ckpt_path=) without the CLI: the module checks the checkpoint it is handed."""
    path = str(tmp_path / "edited.ckpt")
    open(path, "wb").write(open(setup["ckpt"], "rb").read())
    set_field(path, "TextDataModule.train_sampler.consumed", "abc")
    with pytest.raises(ConfigError, match=r"is damaged: TextDataModule\.train_sampler\.consumed is 'abc'"):
        fit_in_python(setup, 16, path)


def test_unreadable_file_is_named(setup, capsys, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    folder = write_corpus(tmp_path / "texts", n_docs=3)
    os.chmod(os.path.join(folder, "doc01.txt"), 0)
    message = one_line_error(capsys, ["fit", "--config", setup["config"], "--data.source", folder])
    assert folder in message


def test_non_utf8_bytes_are_replaced_and_the_run_trains(setup, tmp_path):
    cfg = run_config(tmp_path, str(setup["bad"] / "non_utf8"), str(tmp_path / "cache"), 1)
    main(["fit", "--config", cfg])
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 1


def test_truncated_token_cache_is_rebuilt_not_used(setup, tmp_path):
    cache = tmp_path / "cache"
    main(["fit", "--config", run_config(tmp_path / "a", setup["corpus"], str(cache), 1)])
    (train,) = glob.glob(str(cache / "tokens-*-train.npy"))
    whole = open(train, "rb").read()
    os.truncate(train, len(whole) // 2)
    main(["fit", "--config", run_config(tmp_path / "b", setup["corpus"], str(cache), 1)])
    assert open(train, "rb").read() == whole


def test_different_shape_checkpoint_in_python_is_one_line(setup):
    """Without the CLI (which takes the model settings from the checkpoint): the module's own check."""
    with pytest.raises(ConfigError, match=r"checkpoint .*last\.ckpt was saved for a different model shape: "
                                          r"model\.d_state=16 there, 32 here \(model\.backbone\.layers\.0\.mixer\."
                                          r"in_proj\.weight is \(\d+, 32\) there, \(\d+, 32\) here\): use the model "
                                          r"settings it was trained with"):
        fit_in_python(setup, 32, setup["ckpt"])


def test_passkey_lengths_shorter_than_the_template(setup, capsys):
    with pytest.raises(SystemExit) as e:
        main(["passkey", "--ckpt", setup["ckpt"], "--lengths", "10", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "passkey lengths [10] are shorter than the template" in err and len(err.strip().splitlines()) == 1
