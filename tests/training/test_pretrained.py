"""`--model.pretrained CKPT`: the run takes the checkpoint's model shape (a typed different one is refused) and the
length it was trained at (the state-passing recipe refuses another typed one), records them in its config.yaml and
hyper_parameters, and says in one line what it loaded. Lightning's --optimizer/--lr_scheduler are refused."""

import json
import os

import pytest
import torch
import yaml

from lightning_mamba.cli import lightning_cli, main
from lightning_mamba.errors import UserError
from lightning_mamba.training.checkpoint_io import describe_pretrained, pretrained_meta, settle_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STATE_PASSING = os.path.join(ROOT, "configs", "experiment", "state_passing.yaml")


def run_config(folder, corpus, name, d_state, n_layer, seq_len, steps) -> str:
    """A tiny run's settings in a config file (what a config gives, as opposed to what is typed)."""
    config = {
        "trainer": {"max_steps": steps, "val_check_interval": steps, "limit_val_batches": 1, "log_every_n_steps": 1,
                    "enable_progress_bar": False,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"save_last": True}}],
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(folder / "runs"), "name": name}}},
        "model": {"d_model": 32, "n_layer": n_layer, "d_state": d_state, "headdim": 16, "chunk_size": 16,
                  "backend": "torch", "warmup_steps": 1},
        "data": {"source": corpus, "tokenizer": "byte", "seq_len": seq_len, "batch_size": 2,
                 "cache_dir": str(folder / "cache")},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture
def base(tmp_path, corpus):
    """A 2-step run at d_state 16, 2 layers, seq_len 64: its last.ckpt."""
    main(["fit", "--config", run_config(tmp_path, corpus, "base", d_state=16, n_layer=2, seq_len=64, steps=2)])
    return tmp_path / "runs" / "base" / "version_0" / "checkpoints" / "last.ckpt"


def test_fine_tune_records_the_checkpoints_shape_and_length(tmp_path, corpus, base, capsys):
    """A config asking for d_state 8, 1 layer, seq_len 32: the run trains the checkpoint's model (d_state 16, 2 layers)
    at its length (64), and its config.yaml and hyper_parameters say so; one line says what was loaded."""
    config = run_config(tmp_path, corpus, "tuned", d_state=8, n_layer=1, seq_len=32, steps=1)
    main(["fit", "--config", config, "--model.pretrained", str(base)])
    run = tmp_path / "runs" / "tuned" / "version_0"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["model"]["d_state"], saved["model"]["n_layer"]) == (16, 2)
    assert saved["data"]["init_args"]["seq_len"] == 64
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (ckpt["hyper_parameters"]["d_state"], ckpt["hyper_parameters"]["n_layer"]) == (16, 2)
    assert ckpt["lightning_mamba"]["seq_len"] == 64
    err = capsys.readouterr().err
    loaded = [line for line in err.splitlines() if line.startswith("pretrained: loaded")]
    assert loaded == [f"pretrained: loaded {base}: n_layer 2 x d_model 32, d_state 16, headdim 16, vocabulary 257; "
                      f"trained 2 steps, 256 tokens at seq_len 64"]  # 2 steps of 2 rows of 64 tokens
    assert f"data.seq_len=64: the length {base} was trained at (not 32 as configured" in err


def test_a_typed_shape_that_differs_is_refused(tmp_path, corpus, base):
    config = run_config(tmp_path, corpus, "tuned", d_state=16, n_layer=2, seq_len=64, steps=1)
    with pytest.raises(SystemExit, match=r"fixes the model's shape: model.d_state=16 there, 8 typed: drop "
                                         r"--model.d_state \(or start without --model.pretrained\)"):
        main(["fit", "--config", config, "--model.pretrained", str(base), "--model.d_state", "8"])
    # the same value typed is no conflict
    cli = lightning_cli(["--config", config, "--model.pretrained", str(base), "--model.d_state=16"], run=False)
    assert cli.model.config.mixer["d_state"] == 16


def test_typed_speed_only_settings_are_the_runs_own(tmp_path, corpus, base, capsys):
    """chunk_size and quadratic_max_len change the scan's speed, not the model: typed, they are taken (with a line);
    untyped, the checkpoint's (chunk_size 16) stay."""
    config = run_config(tmp_path, corpus, "tuned", d_state=16, n_layer=2, seq_len=64, steps=1)
    cli = lightning_cli(["--config", config, "--model.pretrained", str(base), "--model.quadratic_max_len", "64",
                         "--model.chunk_size", "32"], run=False)
    assert (cli.model.hparams.quadratic_max_len, cli.model.hparams.chunk_size) == (64, 32)
    assert all((m.quadratic_max_len, m.chunk_size) == (64, 32) for m in cli.model.model.mixers)
    assert "model.quadratic_max_len=64 as typed (the checkpoint's: 0; the scan's speed only)" in capsys.readouterr().err
    cli = lightning_cli(["--config", config, "--model.pretrained", str(base)], run=False)
    assert (cli.model.hparams.quadratic_max_len, cli.model.model.mixers[0].chunk_size) == (0, 16)


def test_a_typed_length_that_differs(tmp_path, corpus, base, capsys):
    """Fine-tuning at another typed length goes on with a line; the state-passing recipe refuses it."""
    config = run_config(tmp_path, corpus, "tuned", d_state=16, n_layer=2, seq_len=64, steps=1)
    cli = lightning_cli(["--config", config, "--model.pretrained", str(base), "--data.seq_len", "32"], run=False)
    assert cli.datamodule.hparams.seq_len == 32
    assert f"data.seq_len=32 as typed: {base} was trained at seq_len 64" in capsys.readouterr().err
    with pytest.raises(UserError, match="state-passing post-training runs at the model's training length: type "
                                        "--data.seq_len 64"):
        lightning_cli(["--config", config, "--config", STATE_PASSING, "--model.pretrained", str(base),
                       "--data.seq_len", "32"], run=False)
    # the recipe over train.yaml (d_state 64, 4 layers, seq_len 512), nothing typed: the checkpoint's model and length
    cli = lightning_cli(["--config", os.path.join(ROOT, "configs", "train.yaml"), "--config", STATE_PASSING,
                         "--data.source", corpus, "--data.tokenizer", "byte", "--data.cache_dir", str(tmp_path / "c"),
                         "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                         "--model.pretrained", str(base)], run=False)
    assert cli.datamodule.hparams.seq_len == 64
    assert (cli.model.hparams.d_state, cli.model.hparams.n_layer, cli.model.hparams.d_model) == (16, 2, 32)


def test_a_tokenizer_of_another_kind_is_refused_before_anything_is_built(tmp_path, corpus, base, monkeypatch):
    """A byte-level checkpoint fine-tuned with data.tokenizer bpe: refused from the settings alone (it was refused only
    after a BPE had been trained and the corpus tokenized)."""
    from lightning_mamba.data import datamodule

    def no_tokenizer(*args, **kwargs):
        raise AssertionError("a tokenizer was built")

    monkeypatch.setattr(datamodule, "build_tokenizer", no_tokenizer)
    config = run_config(tmp_path, corpus, "tuned", d_state=16, n_layer=2, seq_len=64, steps=1)
    with pytest.raises(SystemExit, match=r"model.pretrained=.* was trained with the byte tokenizer, but data.tokenizer "
                                         r"is bpe: set --data.tokenizer byte"):
        main(["fit", "--config", config, "--model.pretrained", str(base), "--data.tokenizer", "bpe"])
    meta = {"mamba_config": pretrained_meta(str(base))["mamba_config"], "tokenizer": {"kind": "json", "name": "bpe-512"}}
    with pytest.raises(UserError, match=r"trained with the tokenizer bpe-512, but data.tokenizer is byte"):
        settle_pretrained("dir", {}, {"tokenizer": "byte"}, set(), False, meta)
    # a BPE trained here at another vocabulary: told by its name, before a BPE of the run's size is trained
    with pytest.raises(UserError, match=r"^model.pretrained=dir was trained with a BPE of vocabulary 512, but "
                                        r"data.bpe_vocab_size is 300: set --data.bpe_vocab_size 512 "):
        settle_pretrained("dir", {}, {"tokenizer": "bpe", "bpe_vocab_size": 300}, set(), False, meta)
    settle_pretrained("dir", {}, {"tokenizer": "bpe", "bpe_vocab_size": 512}, set(), False, meta)  # ids compared later
    other = {**meta, "tokenizer": {"kind": "json", "name": "tokenizer.json"}}  # a downloaded one: its size not named
    settle_pretrained("dir", {}, {"tokenizer": "bpe", "bpe_vocab_size": 300}, set(), False, other)


def test_settle_pretrained_without_a_recorded_length():
    """An official download records no training length: the run's stays, and the line says it is unknown."""
    meta = {"mamba_config": {"d_model": 64, "n_layer": 3, "vocab_size": 100,
                             "ssm_cfg": {"layer": "Mamba2", "d_state": 32, "headdim": 16}}}
    model, data, lines = settle_pretrained("dl", {"d_state": 16, "n_layer": 3}, {"seq_len": 128}, set(), True, meta)
    assert model == {"d_state": 32} and data == {}
    assert lines == ["pretrained: loaded dl: n_layer 3 x d_model 64, d_state 32, headdim 16, vocabulary 100; trained "
                     "for an unrecorded number of steps at seq_len unknown (not recorded)"]
    assert describe_pretrained("x", {**meta, "trained_steps": 5, "seq_len": 9}).endswith("trained 5 steps at seq_len 9")


def test_pretrained_meta_of_an_exported_directory(checkpoint_dir):
    meta = pretrained_meta(str(checkpoint_dir))
    assert meta["mamba_config"]["ssm_cfg"]["d_state"] == 16


@pytest.fixture
def checkpoint_dir(tmp_path):
    from lightning_mamba.data.tokenization import ByteTokenizer
    from lightning_mamba.models.checkpoint import save_pretrained
    from tests.tiny import tiny_lm

    save_pretrained(tiny_lm(vocab_size=257), str(tmp_path / "model"), tokenizer_spec=ByteTokenizer().to_spec())
    return tmp_path / "model"


@pytest.mark.parametrize("option", [["--optimizer", "SGD", "--optimizer.lr", "0.1"],
                                    ["--lr_scheduler", "torch.optim.lr_scheduler.ConstantLR"],
                                    ["--lr_scheduler", "StepLR"],  # (jsonargparse would first ask for its step_size)
                                    ["--config", "optimizer.yaml"]])
def test_lightnings_optimizer_options_are_refused(tmp_path, corpus, option):
    """Our module configures AdamW + its schedule: Lightning's --optimizer would replace it (and --lr_scheduler alone
    would do nothing), so both are refused with one line naming the model.* settings, typed or in a config file."""
    config = run_config(tmp_path, corpus, "x", d_state=16, n_layer=2, seq_len=64, steps=1)
    (tmp_path / "optimizer.yaml").write_text(yaml.safe_dump({"optimizer": {"class_path": "torch.optim.SGD",
                                                                           "init_args": {"lr": 0.1}}}))
    key = "--optimizer" if option[0] == "--config" else option[0]
    with pytest.raises(SystemExit, match=rf"error: {key} is not used by lightning-mamba: .* set --model.lr, "
                                         r"--model.weight_decay"):
        main(["fit", "--config", config, *[str(tmp_path / a) if a.endswith(".yaml") else a for a in option]])


def test_the_module_records_the_loaded_shape(checkpoint_dir):
    """Outside the CLI too: hyper_parameters are the model's, not the arguments the checkpoint overrode."""
    from lightning_mamba.training.module import MambaLitModule

    module = MambaLitModule(pretrained=str(checkpoint_dir), d_state=8, n_layer=1, headdim=32, backend="torch")
    assert (module.hparams.d_state, module.hparams.n_layer, module.hparams.headdim) == (16, 2, 16)
    assert module.hparams.vocab_size == 257 and module.config.mixer["d_state"] == 16


def test_a_resume_keeps_counting_the_tokens_trained(tmp_path, corpus, base):
    """trained_steps/trained_tokens (the line's figures) continue across a --ckpt_path resume."""
    config = run_config(tmp_path, corpus, "base", d_state=16, n_layer=2, seq_len=64, steps=3)
    main(["fit", "--config", config, "--ckpt_path", str(base)])
    ckpt = torch.load(base, weights_only=True)
    assert (ckpt["global_step"], ckpt["tokens_trained"]) == (3, 3 * 2 * 64)
    assert "tokens_trained" not in ckpt["lightning_mamba"]  # training state, not the model's metadata


def test_a_fine_tune_resumes_after_its_pretrained_file_is_gone(tmp_path, corpus, base, capsys):
    """--ckpt_path holds the weights: a fine-tune resumes from its run's config.yaml (which names the pretrained file)
    though that file was deleted, and the resumed run's config and checkpoints still record where it started."""
    start = tmp_path / "start.ckpt"
    start.write_bytes(base.read_bytes())
    config = run_config(tmp_path, corpus, "tuned", d_state=16, n_layer=2, seq_len=64, steps=1)
    main(["fit", "--config", config, "--model.pretrained", str(start)])
    run = tmp_path / "runs" / "tuned" / "version_0"
    start.unlink()
    capsys.readouterr()
    main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
          "--trainer.max_steps", "2"])
    assert "pretrained: loaded" not in capsys.readouterr().err  # the file is not read
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["hyper_parameters"]["pretrained"] == str(start)
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["pretrained"] == str(start)


@pytest.fixture
def json_tokenizer_dir(tmp_path):
    """An exported directory whose tokenizer lives in its tokenizer.json (the bytes, as a tokenizers-library one)."""
    from lightning_mamba.data.tokenization import ByteTokenizer
    from lightning_mamba.models.checkpoint import save_pretrained
    from tests.tiny import tiny_lm

    spec = {"kind": "json", "name": "bytes", "json": ByteTokenizer().to_hf().to_str()}
    save_pretrained(tiny_lm(vocab_size=257), str(tmp_path / "model"), tokenizer_spec=spec)
    return tmp_path / "model"


DAMAGED_FILES = [  # (file, its new text, fragment of the one line)
    ("tokenizer.json", "zz\n", "tokenizer.json cannot be read as a tokenizer (Expecting value: line 1 column 1"),
    ("tokenizer.json", '{"a": 1}', "cannot be read as a tokenizer ("),
    ("config.json", "[1, 2]", "config.json: expected a JSON object, got list [1, 2]"),
    ("config.json", "ssm_cfg", "config.json: ssm_cfg must be an object of the mixer's settings (got 'x')"),
]


@pytest.mark.parametrize("file,text,fragment", DAMAGED_FILES, ids=["tok-garbage", "tok-not-a-tokenizer", "list", "ssm_cfg"])
def test_a_damaged_checkpoint_directory_is_one_line(tmp_path, corpus, json_tokenizer_dir, capsys, file, text,
                                                    fragment):
    """analyze and --model.pretrained read the directory the same way (load_model): one line naming the file, before
    any run directory is made."""
    path = json_tokenizer_dir / file
    if text == "ssm_cfg":
        text = json.dumps({**json.loads(path.read_text()), "ssm_cfg": "x"})
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--ckpt", str(json_tokenizer_dir), "--out", str(tmp_path / "analysis"), "--device", "cpu",
              "--seq_len", "16", "--length", "64"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and fragment in err and len(err.strip().splitlines()) == 1
    config = run_config(tmp_path, corpus, "x", d_state=16, n_layer=2, seq_len=64, steps=1)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", config, "--model.pretrained", str(json_tokenizer_dir)])
    assert fragment in e.value.code and "\n" not in e.value.code and "Traceback" not in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "runs")


def test_an_export_keeps_the_training_done(tmp_path, base):
    """An exported directory records its run's steps and tokens (lightning_mamba.json): --model.pretrained's line
    reports them as for the .ckpt, not "an unrecorded number of steps"."""
    from lightning_mamba.commands.export import export

    export(str(base), str(tmp_path / "exported"))
    line = describe_pretrained(str(tmp_path / "exported"), pretrained_meta(str(tmp_path / "exported")))
    assert line.endswith("trained 2 steps, 256 tokens at seq_len 64")
    assert line == describe_pretrained(str(tmp_path / "exported"), pretrained_meta(str(base)))


def test_resuming_a_bpe_run_at_another_vocabulary_is_refused_before_a_bpe_is_trained(tmp_path, corpus, monkeypatch):
    """--ckpt_path of a run that trained a 300-entry BPE with data.bpe_vocab_size 400: refused in one line from the
    settings (it was refused only after a 400-entry BPE had been trained and the corpus tokenized)."""
    from lightning_mamba.data import datamodule

    config = run_config(tmp_path, corpus, "bpe", d_state=16, n_layer=2, seq_len=64, steps=1)
    main(["fit", "--config", config, "--data.tokenizer", "bpe", "--data.bpe_vocab_size", "300"])
    (ckpt,) = (tmp_path / "runs" / "bpe" / "version_0" / "checkpoints").glob("last*.ckpt")

    def no_tokenizer(*args, **kwargs):
        raise AssertionError("a tokenizer was built")

    monkeypatch.setattr(datamodule, "build_tokenizer", no_tokenizer)
    with pytest.raises(SystemExit, match=r"^error: checkpoint .* was trained with a BPE of vocabulary 300, but "
                                         r"data.bpe_vocab_size is 400: set --data.bpe_vocab_size 300 "):
        main(["fit", "--config", config, "--data.tokenizer", "bpe", "--data.bpe_vocab_size", "400",
              "--trainer.max_steps", "2", "--ckpt_path", str(ckpt)])
