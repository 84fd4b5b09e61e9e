"""PasskeyEvalCallback inside a real Trainer on PasskeyDataModule: TensorBoard scalars and images, JSON, cadence;
and the passkey experiment config on top of the default one."""

import json
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_mamba.callbacks.passkey import PasskeyEvalCallback
from lightning_mamba.data.datamodule import TextDataModule
from lightning_mamba.data.passkey import PasskeyDataModule
from lightning_mamba.training.module import MambaLitModule

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ_LEN = 256  # the byte tokenizer needs >= ~190 tokens for the paper's template and answer


def passkey_data(tmp_path) -> PasskeyDataModule:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in range(8):
        (corpus / f"doc{d:02d}.txt").write_text("".join(f"{d} line {i}: the cat sat on the mat.\n" for i in range(60)))
    return PasskeyDataModule(passkey_ratio=0.5, passkey_loss="answer", source=str(corpus), tokenizer="byte",
                             seq_len=SEQ_LEN, batch_size=4, val_fraction=0.25, cache_dir=str(tmp_path / "cache"))


def test_callback_logs_scalars_figures_and_json(tmp_path):
    torch.manual_seed(0)
    module = MambaLitModule(d_model=32, n_layer=2, d_state=16, headdim=16, chunk_size=64, vocab_size=257,
                            backend="torch", warmup_steps=1)
    passkey = PasskeyEvalCallback(every_n_validations=1, multiples=(0.5, 1, 2, 4, 8), n_depths=2, n_samples=2,
                                  piece_len=512)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, val_check_interval=2, limit_val_batches=1,
                        num_sanity_val_steps=0, logger=TensorBoardLogger(tmp_path, name="run"), callbacks=[passkey],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1)
    with pytest.warns(UserWarning, match=r"lengths \[128\] are shorter than the template"):
        trainer.fit(module, datamodule=passkey_data(tmp_path))

    acc = EventAccumulator(trainer.log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])
    assert {f"passkey/acc@{m}x" for m in (1, 2, 4, 8)} | {"passkey/t_recall"} <= scalars
    assert "passkey/acc@0.5x" not in scalars  # 128 tokens: shorter than the template, skipped
    assert {"passkey/accuracy_heatmap", "passkey/accuracy_vs_length"} <= images
    assert [e.step for e in acc.Scalars("passkey/acc@1x")] == [2, 3]  # after the validation at 2, and at fit end
    assert all(0 <= e.value <= 1 for e in acc.Scalars("passkey/acc@8x"))

    record = json.loads((tmp_path / "run" / "version_0" / "passkey" / "step_3.json").read_text())
    assert record["seq_len"] == SEQ_LEN and record["lengths"] == [256, 512, 1024, 2048]
    assert record["depths"] == [0.25, 0.75] and record["samples_per_cell"] == 2
    assert len(record["accuracy"]) == 2 and len(record["accuracy"][0]) == 4 and record["canonical_tokenization"]
    assert record["metrics"]["passkey/t_recall"] == (record["t_recall"] or 0)
    # needle distances (1 - depth) x length / LEN: 0.25, 0.75, 0.5, 1.5, 1, 3, 2, 6
    assert list(record["accuracy_by_distance"]) == ["0-1x", "1-2x", "2-4x", "4-8x"]
    assert [record["accuracy_by_distance"][k]["prompts"] for k in ("0-1x", "1-2x", "2-4x", "4-8x")] == [8, 4, 2, 2]
    assert {f"passkey/by_distance/{k}" for k in record["accuracy_by_distance"]} <= scalars

    # the run's evaluations along training, as `lightning-mamba passkey-trend --run <log dir>` reads them
    from lightning_mamba.cli import main
    with pytest.raises(SystemExit) as e:
        main(["passkey-trend", "--run", trainer.log_dir])
    assert e.value.code == 0
    assert os.path.getsize(os.path.join(trainer.log_dir, "passkey", "trend.png")) > 0
    trend = json.loads((tmp_path / "run" / "version_0" / "passkey" / "trend.json").read_text())
    assert trend["steps"] == [2, 3] and trend["lengths"] == [256, 512, 1024, 2048]

    module.model.train()
    passkey._run(trainer, module)  # the model goes back in the mode it came in
    assert module.model.training


@pytest.mark.parametrize("config", ["passkey.yaml", "passkey_keep.yaml"])
def test_passkey_experiment_config_overlays_the_default_run(config):
    from lightning_mamba.cli import MambaCLI

    args = ["--config", os.path.join(ROOT, "configs/train.yaml"),
            "--config", os.path.join(ROOT, "configs/experiment", config), "--trainer.logger", "false"]
    # the data class is chosen by the config: the CLI's data argument in subclass mode
    cli = MambaCLI(MambaLitModule, TextDataModule, subclass_mode_data=True, args=args, run=False)
    dm = cli.datamodule
    assert isinstance(dm, PasskeyDataModule) and dm.hparams.tokenizer == "bpe"  # the rest comes from train.yaml
    assert 0 < dm.hparams.passkey_ratio <= 1 and dm.hparams.passkey_loss in ("all", "answer")
    assert cli.model.hparams.vocab_size == dm.vocab_size_for_model
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert "PasskeyEvalCallback" in names and "LengthGeneralizationCallback" in names  # appended, not replaced


@pytest.mark.parametrize("override,fragment", [
    (["--trainer.callbacks.n_samples", "0"], "PasskeyEvalCallback: n_samples and n_depths must be >= 1 (got 0, 1)"),
    (["--trainer.callbacks.multiples", "[]"], "PasskeyEvalCallback: multiples must be positive"),
    (["--trainer.callbacks.multiples", "[1, 1e400]"], "PasskeyEvalCallback: multiples must be positive finite"),
    (["--trainer.callbacks.multiples", "[.nan]"], "PasskeyEvalCallback: multiples must be positive finite"),
    (["--trainer.callbacks.threshold", "1.0"], "PasskeyEvalCallback: threshold must be in [0, 1)"),
])
def test_bad_callback_argument_is_one_line(tmp_path, capsys, override, fragment):
    # a ValueError from the callback's __init__ came out of jsonargparse as two tracebacks and a dump of every callback;
    # an infinite multiple was a traceback after training, at the first evaluation (hence a tiny run here)
    from lightning_mamba.cli import main

    corpus = passkey_data(tmp_path).hparams.source
    tiny = ["--model.d_model", "32", "--model.n_layer", "2", "--model.d_state", "16", "--model.headdim", "16",
            "--model.backend", "torch", "--data.source", corpus, "--data.tokenizer", "byte", "--data.batch_size", "2",
            "--data.val_fraction", "0.25", "--data.cache_dir", str(tmp_path / "cache"), "--trainer.max_steps", "1",
            "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
            "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks.n_depths", "1", "--trainer.callbacks.n_samples", "1"]
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", os.path.join(ROOT, "configs/train.yaml"), "--config",
              os.path.join(ROOT, "configs/experiment/passkey.yaml"), *tiny, *override])
    message = str(e.value.code)
    assert message.startswith("error: ") and fragment in message and "\n" not in message
    assert "Traceback" not in capsys.readouterr().err
