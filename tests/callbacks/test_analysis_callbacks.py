"""The forgetting callbacks inside a real Trainer: TensorBoard tags, files, cadence, finite curves."""

import json
import time

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_mamba.analysis.evaluator import read_position_losses_csv
from lightning_mamba.callbacks import LengthGeneralizationCallback, StateStatsCallback
from lightning_mamba.data import TextDataModule
from lightning_mamba.training.module import MambaLitModule

SEQ_LEN = 32


def text_data(tmp_path, seq_len=SEQ_LEN) -> TextDataModule:
    """The project's data module over a small corpus of 12 documents, byte tokenizer."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in range(12):
        (corpus / f"doc{d:02d}.txt").write_text("".join(f"{d} line {i}: the cat sat on the mat.\n" for i in range(40)))
    return TextDataModule(source=str(corpus), tokenizer="byte", seq_len=seq_len, batch_size=4,
                          val_fraction=0.2, cache_dir=str(tmp_path / "cache"))


def fit_observed(tmp_path, module, callbacks, max_steps: int, num_sanity_val_steps: int):
    """A CPU fit validating every 2 steps with TensorBoard; returns the trainer and its events, loaded."""
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, val_check_interval=2, limit_val_batches=1,
                        num_sanity_val_steps=num_sanity_val_steps, logger=TensorBoardLogger(tmp_path, name="run"),
                        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, datamodule=text_data(tmp_path))
    acc = EventAccumulator(trainer.log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return trainer, acc


def test_callbacks_log_tags_and_files(tmp_path):
    torch.manual_seed(0)
    module = MambaLitModule(d_model=32, n_layer=2, d_state=16, headdim=16, chunk_size=32, vocab_size=257,
                            backend="torch", warmup_steps=1)
    lengthgen = LengthGeneralizationCallback(every_n_validations=1, multiples=(1, 2, 4, 8, 16), n_rows=2,
                                             piece_len=256)  # small: the defaults (64 x T, 32 rows) are slow on CPU
    stats = StateStatsCallback(every_n_validations=2, stride=64)
    trainer, acc = fit_observed(tmp_path, module, [lengthgen, stats], max_steps=5, num_sanity_val_steps=1)
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])
    assert {f"lengthgen/loss@{m}x" for m in (1, 2, 4, 8, 16)} <= scalars
    assert {"lengthgen/forgets", "lengthgen/blowup_position", "lengthgen/ratio_4_16x"} <= scalars
    assert {"state/norm_max@1x", "state/norm_max@16x", "state/norm_growth", "state/outlier_share",
            "retention/frac_heads_above_0.99", "retention/max_first_token", "state_newlines/norm_growth"} <= scalars
    assert {"lengthgen/loss_vs_position", "state/norm_vs_position", "retention/heatmap", "retention/log_retention_vs_position",
            "state_newlines/norm_vs_position"} <= images
    # after the validations at steps 2 and 4 (not the sanity check) and at the end of fit (step 5)
    assert [e.step for e in acc.Scalars("lengthgen/loss@16x")] == [2, 4, 5]
    assert [e.step for e in acc.Scalars("state/norm_growth")] == [4, 5]  # every 2nd validation, and the end

    out = tmp_path / "run" / "version_0"
    record = json.loads((out / "lengthgen" / "step_5.json").read_text())
    assert record["seq_len"] == SEQ_LEN and record["rows"]["rows"] == 2
    earlier = json.loads((out / "lengthgen" / "step_4.json").read_text())
    assert earlier["written_at_ms"] < record["written_at_ms"] <= time.time() * 1000  # each record's wall clock
    assert "per_position_loss" not in record and record["per_position_csv"] == "step_5.csv"  # the curve once
    per_pos = read_position_losses_csv(str(out / "lengthgen" / record["per_position_csv"]))
    assert per_pos.shape == (16 * SEQ_LEN,) and np.isfinite(per_pos).all()
    assert len(record["bucket_loss"]) == 16 * SEQ_LEN // 16 and np.isfinite(record["bucket_loss"]).all()
    assert per_pos[-1] < np.log(257) + 1  # a trained-a-little model, not garbage
    csv_lines = (out / "lengthgen" / "step_5.csv").read_text().splitlines()
    assert csv_lines[0] == "position,loss" and len(csv_lines) == 16 * SEQ_LEN + 1
    st = json.loads((out / "state_stats" / "step_5.json").read_text())
    assert np.array(st["text"]["stats"]["rms"]).shape == (1 + 16 * SEQ_LEN // 64, 2, 4)  # T_train, then every 64
    # curves written with six significant digits (float32 measurements; the files stay half the size)
    for values in (per_pos.tolist(), np.ravel(st["text"]["stats"]["rms"]).tolist()):
        assert all(float(f"{v:.6g}") == v for v in values) and any(v != round(v, 2) for v in values)
    assert np.isfinite(np.array(st["newlines"]["stats"]["log_retention"])).all()

    module.model.train()  # the callbacks hand the model back in the mode they found it
    lengthgen._run(trainer, module)
    assert module.model.training


def fit_with_figure_cadences(tmp_path, max_steps: int):
    """A fit validating every 2 steps whose observers draw figures every 2nd (lengthgen) and 3rd (state) run; returns
    the LengthGeneralizationCallback and the run's events."""
    torch.manual_seed(0)
    module = MambaLitModule(d_model=32, n_layer=1, d_state=16, headdim=16, chunk_size=32, vocab_size=257,
                            backend="torch", warmup_steps=1)
    lengthgen = LengthGeneralizationCallback(multiples=(1, 2, 4), n_rows=1, piece_len=256, figures_every_n_runs=2)
    stats = StateStatsCallback(multiples=(1, 4), stride=32, probes=("text",), figures_every_n_runs=3)
    _, acc = fit_observed(tmp_path, module, [lengthgen, stats], max_steps=max_steps, num_sanity_val_steps=0)
    return lengthgen, acc


def test_figures_every_n_runs_draws_first_nth_and_last(tmp_path):
    """Figures at the first run, every N-th and the end of fit; scalars and JSON at every run."""
    lengthgen, acc = fit_with_figure_cadences(tmp_path, max_steps=7)
    # validations at 2, 4, 6, then the end of fit at 7: runs 0-3
    assert [e.step for e in acc.Scalars("lengthgen/loss@4x")] == [2, 4, 6, 7]
    assert [e.step for e in acc.Images("lengthgen/loss_vs_position")] == [2, 6, 7]  # runs 0, 2 and the end
    assert [e.step for e in acc.Scalars("state/norm_growth")] == [2, 4, 6, 7]
    assert [e.step for e in acc.Images("state/norm_vs_position")] == [2, 7]  # run 0, then run 3 is the end
    assert lengthgen.state_dict()["runs"] == 4
    out = tmp_path / "run" / "version_0"
    assert sorted(p.name for p in (out / "lengthgen").glob("*.json")) == [f"step_{s}.json" for s in (2, 4, 6, 7)]
    with pytest.raises(ValueError, match="figures_every_n_runs"):
        LengthGeneralizationCallback(figures_every_n_runs=0)


def test_figures_at_the_end_when_the_last_validation_ends_fit(tmp_path):
    """max_steps a multiple of val_check_interval: the validation at max_steps is the end of fit (on_fit_end does not
    run the analysis again), so its figures are drawn whatever the cadence."""
    lengthgen, acc = fit_with_figure_cadences(tmp_path, max_steps=8)
    assert [e.step for e in acc.Scalars("lengthgen/loss@4x")] == [2, 4, 6, 8]  # runs 0-3, the last at the end
    assert [e.step for e in acc.Images("lengthgen/loss_vs_position")] == [2, 6, 8]
    assert [e.step for e in acc.Images("state/norm_vs_position")] == [2, 8]


def test_observer_scalars_can_drive_model_checkpoint(tmp_path):
    """lengthgen/* reach trainer.callback_metrics, so ModelCheckpoint can keep the checkpoint that forgets best."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    module = MambaLitModule(d_model=32, n_layer=2, d_state=16, headdim=16, chunk_size=32, vocab_size=257,
                            backend="torch", warmup_steps=1)
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="lengthgen/ratio_4_16x", mode="min", save_top_k=1)
    lengthgen = LengthGeneralizationCallback(every_n_validations=1, multiples=(1, 4, 16), n_rows=2, piece_len=256)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, val_check_interval=2, limit_val_batches=1,
                        num_sanity_val_steps=0, logger=False, callbacks=[best, lengthgen],  # checkpoint listed first
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=text_data(tmp_path))
    ratio = trainer.callback_metrics["lengthgen/ratio_4_16x"]
    assert best.best_model_score is not None and torch.isfinite(best.best_model_score)
    assert best.best_model_score <= ratio + 1e-6 and best.best_model_path.endswith(".ckpt")
    assert "lengthgen/forgets" in trainer.callback_metrics


def test_lengthgen_logs_ratio_16_64x_with_its_interval(tmp_path):
    """By default the callback evaluates to 64 x T_train: the ratio over [16T, 64T] and its bootstrap interval
    go to TensorBoard, callback_metrics and step_N.json (T_train 16 and 2 rows keep it small)."""
    torch.manual_seed(0)
    module = MambaLitModule(d_model=32, n_layer=2, d_state=16, headdim=16, chunk_size=16, vocab_size=257,
                            backend="torch", warmup_steps=1)
    lengthgen = LengthGeneralizationCallback(n_rows=2, piece_len=256)
    assert lengthgen.multiples == (1, 2, 4, 8, 16, 32, 64)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, limit_val_batches=0, num_sanity_val_steps=0,
                        logger=TensorBoardLogger(tmp_path, name="run"), callbacks=[lengthgen],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=text_data(tmp_path, seq_len=16))

    acc = EventAccumulator(trainer.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = {"lengthgen/ratio_16_64x", "lengthgen/ratio_16_64x_lo", "lengthgen/ratio_16_64x_hi", "lengthgen/loss@64x"}
    assert tags <= set(acc.Tags()["scalars"]) and tags <= set(trainer.callback_metrics)
    record = json.loads((tmp_path / "run" / "version_0" / "lengthgen" / "step_1.json").read_text())
    v = record["verdict"]
    assert v["evaluated_to"] == 64 * 16 and v["rows"] == record["rows"]["rows"] >= 1
    assert v["ratio_16_64x_lo"] <= v["ratio_16_64x"] <= v["ratio_16_64x_hi"]
    assert record["metrics"]["lengthgen/ratio_16_64x"] == v["ratio_16_64x"]


@pytest.mark.parametrize("kwargs, message", [
    ({"multiples": [0]}, "multiples must be whole multiples of LEN >= 1"), ({"multiples": []}, "multiples"),
    ({"n_rows": 0}, "n_rows and stride"), ({"stride": 0}, "n_rows and stride"),
    ({"retention_threshold": 1.0}, "retention_threshold"), ({"top_fraction": 0.0}, "top_fraction")])
def test_state_stats_settings_that_cannot_work_are_refused_before_training(kwargs, message):
    """(Each was taken and failed at the first evaluation, after training.)"""
    from lightning_mamba.callbacks import StateStatsCallback

    with pytest.raises(ValueError, match=f"^StateStatsCallback: .*{message}"):
        StateStatsCallback(**kwargs)
    StateStatsCallback(multiples=[1, 4], stride=2)


@pytest.mark.parametrize("threshold", [1.0, 0.5, -1.0, float("inf"), float("nan")])
def test_a_threshold_that_cannot_judge_is_refused(threshold):
    """The criterion's factor is a loss ratio > 1 (the commands and the sweep say the same); T_recall's lies in [0, 1)."""
    from lightning_mamba.callbacks import PasskeyEvalCallback

    with pytest.raises(ValueError, match=r"threshold must be a finite number > 1 \(got "):
        LengthGeneralizationCallback(threshold=threshold)
    LengthGeneralizationCallback(threshold=1.5)
    bad_recall = threshold if threshold != 0.5 else 1.0
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\) \(got "):
        PasskeyEvalCallback(threshold=bad_recall)
    PasskeyEvalCallback(threshold=0.0)


def test_a_bucket_the_criterion_cannot_use_stops_the_fit_before_training(tmp_path):
    """A bucket above half of data.seq_len (the criterion leaves the first bucket out, so its reference needs a
    second one within T_train) is refused at setup, in one line naming the setting, before any step trains (it used
    to fail at the first evaluation); half of seq_len is accepted."""
    from lightning_mamba.models.config import ConfigError

    steps = []

    class CountSteps(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append(trainer.global_step)

    module = MambaLitModule(d_model=32, n_layer=2, d_state=16, headdim=16, chunk_size=32, vocab_size=257,
                            backend="torch", warmup_steps=1)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(ConfigError, match=r"^LengthGeneralizationCallback's bucket must be a whole number between 1 "
                                          r"and half the training length, 16 \(got 17\).*\(data.seq_len\)$"):
        fit_observed(tmp_path / "a", module, [LengthGeneralizationCallback(bucket=17, n_rows=1), CountSteps()], 2, 0)
    assert steps == []
    trainer, _ = fit_observed(tmp_path / "b", module, [LengthGeneralizationCallback(bucket=16, n_rows=1,
                                                                                   multiples=[1, 2, 4])], 2, 0)
    assert (tmp_path / "b" / "run" / "version_0" / "lengthgen" / "step_2.json").is_file()
