"""Evaluations are not lost on resume: a run killed during the validation right after a checkpoint of the same step
(ModelCheckpoint(every_n_train_steps) saves before it) and resumed from that checkpoint gets the forgetting
analyses of that step (lengthgen/*, state/*, their step_N.json) at the start of training; Lightning itself does not
redo that validation."""

import json
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_mamba.callbacks import LengthGeneralizationCallback, StateStatsCallback
from lightning_mamba.data import TextDataModule
from lightning_mamba.training.module import MambaLitModule

SEQ_LEN, EVERY = 32, 2  # a validation and a checkpoint every 2 steps


class Killed(RuntimeError):
    pass


class KillDuringValidation(L.Callback):
    """Raise in the validation of step ``step``, after the checkpoint of that step was written."""

    def __init__(self, step: int):
        self.step = step

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking and trainer.global_step == self.step:
            raise Killed(f"killed during the validation of step {self.step}")


@pytest.fixture
def data_dir(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in range(12):
        (corpus / f"doc{d:02d}.txt").write_text("".join(f"{d} line {i}: the cat sat on the mat.\n" for i in range(40)))
    return tmp_path


def fit(folder, max_steps: int, ckpt_path=None, version=None, extra=()):
    """A tiny fit; returns its log directory and its callbacks (the length-generalization one every validation, the
    state statistics every 2nd)."""
    torch.manual_seed(0)
    module = MambaLitModule(d_model=32, n_layer=2, d_state=16, headdim=16, chunk_size=32, vocab_size=257,
                            backend="torch", warmup_steps=1)
    data = TextDataModule(source=str(folder / "corpus"), tokenizer="byte", seq_len=SEQ_LEN, batch_size=4,
                          val_fraction=0.2, cache_dir=str(folder / "cache"))
    lengthgen = LengthGeneralizationCallback(every_n_validations=1, multiples=(1, 2, 4), n_rows=1, piece_len=128)
    stats = StateStatsCallback(every_n_validations=2, multiples=(1, 4), stride=64, probes=["text"])
    logger = CSVLogger(folder / "runs", name="tiny", version=version)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, val_check_interval=EVERY,
                        check_val_every_n_epoch=None, limit_val_batches=1, num_sanity_val_steps=0, logger=logger,
                        callbacks=[ModelCheckpoint(dirpath=folder / "ckpt", every_n_train_steps=EVERY, save_last=True),
                                   lengthgen, stats, *extra],
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return logger.log_dir, lengthgen, stats


def logged_steps(log_dir, metric: str) -> list[int]:
    import csv

    with open(os.path.join(log_dir, "metrics.csv")) as f:
        return sorted(int(r["step"]) for r in csv.DictReader(f) if r.get(metric))


def logged_value(log_dir, metric: str, step: int) -> float:
    import csv

    with open(os.path.join(log_dir, "metrics.csv")) as f:
        return next(float(r[metric]) for r in csv.DictReader(f) if r.get(metric) and int(r["step"]) == step)


def test_an_evaluation_killed_after_its_checkpoint_is_redone_on_resume(data_dir):
    with pytest.raises(Killed):
        fit(data_dir, 6, extra=[KillDuringValidation(4)])
    first = os.path.join(data_dir, "runs", "tiny", "version_0")
    assert os.path.exists(os.path.join(first, "lengthgen", "step_2.json"))
    assert not os.path.exists(os.path.join(first, "lengthgen", "step_4.json"))  # the kill came before it
    last = data_dir / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4

    log_dir, lengthgen, stats = fit(data_dir, 6, ckpt_path=last)
    assert log_dir != first
    record = json.loads(open(os.path.join(log_dir, "lengthgen", "step_4.json")).read())
    assert record["step"] == 4 and "ratio_4_16x" not in record["metrics"]  # evaluated to 4 x T here
    assert logged_steps(log_dir, "lengthgen/loss@4x") == [4, 6]  # the redone step, then the validation at 6
    # every 2nd validation: the checkpoint counted the one at step 2, so the redone one at step 4 is the 2nd
    assert os.path.exists(os.path.join(log_dir, "state_stats", "step_4.json"))
    assert logged_steps(log_dir, "state/norm_max@4x") == [4, 6]  # 4: the 2nd validation; 6: the end of fit
    assert (lengthgen._validations, stats._validations) == (3, 3)
    # the validation loss of step 4 too (Lightning does not redo that validation), from the same batches
    # (Lightning logs the validation after step N at step N - 1)
    assert logged_steps(first, "val/loss") == [1]
    assert logged_steps(log_dir, "val/loss") == [3, 5]
    assert json.load(open(os.path.join(log_dir, "val", "step_4.json")))["step"] == 4
    # and it is the value the uninterrupted run's own validation of step 4 gives
    (data_dir / "again").mkdir()
    os.symlink(data_dir / "corpus", data_dir / "again" / "corpus")
    straight, _, _ = fit(data_dir / "again", 6)
    assert logged_value(log_dir, "val/loss", 3) == pytest.approx(logged_value(straight, "val/loss", 3), rel=1e-6)


def test_a_finished_evaluation_is_not_redone_and_a_fresh_run_evaluates_nothing_at_start(data_dir):
    log_dir, lengthgen, _ = fit(data_dir, 4, version=0)
    assert logged_steps(log_dir, "lengthgen/loss@4x") == [2, 4]
    result = os.path.join(log_dir, "lengthgen", "step_4.json")
    stamp = os.stat(result).st_mtime_ns
    # the checkpoint of step 4 was written before its validation; that validation finished (step_4.json is in the
    # run directory, which the resumed run logs into again): nothing to redo
    ckpt = next(p for p in os.listdir(data_dir / "ckpt") if "step=4" in p)
    _, again, _ = fit(data_dir, 6, ckpt_path=data_dir / "ckpt" / ckpt, version=0)
    assert os.stat(result).st_mtime_ns == stamp
    val_record = os.path.join(log_dir, "val", "step_4.json")
    assert os.path.exists(val_record)  # nor is the validation loss: its record is there
    assert again._validations == 3  # 2 before, counted by the checkpoint (the one at 4 too), 1 after
    # and so is the analysis of step 4 counted, which sets the figures' cadence (figures_every_n_runs): as uninterrupted
    assert again.state_dict()["runs"] == 3
