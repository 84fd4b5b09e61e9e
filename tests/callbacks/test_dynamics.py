"""DecayDynamicsCallback's measurements: A, dt and alpha_T per head, checked against hand-set parameters."""

import math
import os

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_mamba.callbacks.dynamics import DecayDynamicsCallback, decay_dynamics, mixers, summarize
from lightning_mamba.data import TextDataModule
from lightning_mamba.training.module import MambaLitModule
from tests.tiny import tiny_lm


def set_heads(lm, A: list[float], dt: list[float]) -> None:
    for m in mixers(lm):
        m.A_log.data = torch.log(torch.tensor(A, dtype=m.A_log.dtype))
        m.dt_bias.data = torch.log(torch.expm1(torch.tensor(dt, dtype=m.dt_bias.dtype)))  # softplus^-1


def test_alpha_T_from_the_parameters():
    lm = tiny_lm()  # 2 layers, 4 heads each
    heads = mixers(lm)[0].A_log.numel()
    A = [1e-4, 1e-2, 1.0, 8.0][:heads]
    dt = [0.01] * heads
    set_heads(lm, A, dt)
    T = 64
    dyn = decay_dynamics(lm, T)
    want = [math.exp(-a * d * T) for a, d in zip(A, dt)]
    assert np.allclose(dyn["alpha_T_bias"][1], want, rtol=1e-6)
    assert np.allclose(dyn["A"][0], [-a for a in A], rtol=1e-6)
    s = summarize(dyn, 0.99)
    # alpha_T above 0.99: A = 1e-4 (0.99994) and 1e-2 (0.9936); not A = 1 (0.527) nor 8 (0.006); 2 layers
    assert s["dynamics/heads_alpha_T_bias_gt_0.99"] == 2 * 2 and s["dynamics/heads"] == 2 * heads
    assert s["dynamics/A_median"] == pytest.approx(-np.median(A))
    assert "dynamics/alpha_T_median" not in s  # no probe rows: the parameter view only


def test_the_probe_measures_the_dt_the_model_uses():
    lm = tiny_lm().train()  # as during training: the probe runs in eval mode and hands the mode back
    heads = mixers(lm)[0].A_log.numel()
    set_heads(lm, [0.5] * heads, [0.02] * heads)
    rows = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    dyn = decay_dynamics(lm, 32, rows)
    assert not np.allclose(dyn["dt_mean"][0], dyn["dt_bias_softplus"][0])  # the input moves dt
    for m in mixers(lm):  # zero the input's share of dt: then dt = softplus(dt_bias) at every token
        m.in_proj.weight.data[-heads:] = 0
        if m.in_proj.bias is not None:
            m.in_proj.bias.data[-heads:] = 0
    dyn = decay_dynamics(lm, 32, rows)
    assert np.allclose(dyn["dt_mean"], dyn["dt_bias_softplus"], rtol=1e-6)
    assert np.allclose(dyn["alpha_T"], dyn["alpha_T_bias"], rtol=1e-6)
    assert dyn["probe_tokens"] == 64 and lm.training


# ---- along training: one record per step, also across a resume ------------------------------------------------
class CountingDynamics(DecayDynamicsCallback):
    """Records the steps it measured."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.measured: list[int] = []

    def _measure(self, trainer, model, T, step, rows):
        self.measured.append(step)
        super()._measure(trainer, model, T, step, rows)


def fit_tiny(folder, max_steps: int, ckpt_path=None) -> tuple[CountingDynamics, str]:
    corpus = folder / "corpus"
    if not corpus.exists():
        corpus.mkdir()
        for d in range(8):
            (corpus / f"doc{d}.txt").write_text("".join(f"{d} line {i}: the cat sat on the mat.\n" for i in range(30)))
    torch.manual_seed(0)
    module = MambaLitModule(d_model=32, n_layer=2, d_state=16, headdim=16, chunk_size=32, vocab_size=257,
                            backend="torch", warmup_steps=1)
    data = TextDataModule(source=str(corpus), tokenizer="byte", seq_len=32, batch_size=4, val_fraction=0.25,
                          cache_dir=str(folder / "cache"))
    dynamics = CountingDynamics(every_n_steps=2, histograms=False)
    logger = CSVLogger(folder / "runs", name="tiny", version=0)  # the resumed run logs into the same directory
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, limit_val_batches=0, logger=logger,
                        callbacks=[ModelCheckpoint(dirpath=folder / "ckpt", every_n_train_steps=2, save_last=True),
                                   dynamics],
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return dynamics, logger.log_dir


def test_a_resume_does_not_measure_the_checkpoints_step_again(tmp_path):
    first, log_dir = fit_tiny(tmp_path, 4)
    assert first.measured == [0, 2, 4]
    second, _ = fit_tiny(tmp_path, 6, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert second.measured == [6]  # step 4 was measured (from these weights) by the first run
    assert sorted(os.listdir(os.path.join(log_dir, "dynamics"))) == [f"step_{s}.json" for s in (0, 2, 4, 6)]


def test_a_resume_measures_the_checkpoints_step_when_its_record_is_missing(tmp_path):
    _, log_dir = fit_tiny(tmp_path, 4)
    os.remove(os.path.join(log_dir, "dynamics", "step_4.json"))  # killed before it was written
    second, _ = fit_tiny(tmp_path, 6, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert second.measured == [4, 6]
