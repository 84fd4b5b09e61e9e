"""Norm clipping reuses the NaN guard's gradient norm (one norm per step, not two) and trains exactly as before."""

import lightning as L
import pytest
import torch

from lightning_mamba.data import TextDataModule
from lightning_mamba.training.module import MambaLitModule
from lightning_mamba.training.nan_guard import NanGuard
from tests.robust.helpers import FusedOptimizer


class RecordGradNorm(L.Callback):
    def __init__(self):
        self.norms = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.norms.append(float(trainer.callback_metrics["train/grad_norm"]))


def fit_tiny(tmp_path, corpus, callbacks, max_steps, **trainer_args) -> MambaLitModule:
    """A 2-layer byte-level model fitted for ``max_steps`` on the CPU, the norm logged at every step."""
    torch.manual_seed(0)
    module = MambaLitModule(d_model=32, n_layer=2, d_state=16, headdim=16, chunk_size=32, vocab_size=257,
                            backend="torch", warmup_steps=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, callbacks=callbacks, **trainer_args)
    data = TextDataModule(source=corpus, tokenizer="byte", seq_len=32, batch_size=4, val_fraction=0.2,
                          cache_dir=str(tmp_path / "cache"))
    trainer.fit(module, datamodule=data)
    return module


def train(tmp_path, corpus, callbacks, monkeypatch) -> tuple[dict, list, int]:
    """5 clipped steps (the clip is active: max norm 0.05); returns the weights, the logged norms and how many times
    clip_grad_norm_ (the clip that computes its own norm) ran."""
    calls = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(1) or clip(*a, **k))
    record = RecordGradNorm()
    module = fit_tiny(tmp_path, corpus, [*callbacks, record], 5, gradient_clip_val=0.05)
    return {k: v.clone() for k, v in module.state_dict().items()}, record.norms, len(calls)


@pytest.mark.parametrize("fused", [False, True], ids=["checked-now", "deferred-check"])
def test_clipping_reuses_the_guards_norm_and_trains_the_same(tmp_path, corpus, monkeypatch, fused):
    extra = [FusedOptimizer()] if fused else []
    alone, norms_alone, clips_alone = train(tmp_path / "a", corpus, extra, monkeypatch)
    guarded, norms_guarded, clips_guarded = train(tmp_path / "b", corpus, [*extra, NanGuard()], monkeypatch)
    assert clips_alone == 5 and clips_guarded == 0  # the guard's norm served every step
    assert min(norms_alone) > 0.05  # the clip was active
    assert norms_guarded == pytest.approx(norms_alone, rel=1e-6)
    for name, value in alone.items():
        torch.testing.assert_close(guarded[name], value, rtol=0, atol=0, msg=name)


def test_a_norm_offered_for_another_step_is_not_used(tmp_path, corpus, monkeypatch):
    """A stale offer (an earlier step's) must not clip this step's gradients."""
    class OfferStale(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            pl_module._offered_grad_norm = (trainer.global_step - 1, torch.tensor(1e6))

    _, _, clips = train(tmp_path, corpus, [OfferStale()], monkeypatch)
    assert clips == 5


@pytest.mark.parametrize("clip", [{"gradient_clip_val": 0}, {"gradient_clip_val": None},
                                  {"gradient_clip_val": 1e-3, "gradient_clip_algorithm": "value"}],
                         ids=["clip-0", "clip-null", "clip-by-value"])
@pytest.mark.parametrize("guarded", [False, True], ids=["no-guard", "guard"])
def test_the_gradient_norm_is_logged_without_norm_clipping(tmp_path, corpus, clip, guarded):
    """train/grad_norm is the gradients' norm (before a value clip) whether or not norm clipping is on: turning the
    clip off used to take the curve out of TensorBoard and callback_metrics."""
    class Norms(L.Callback):
        def __init__(self):
            self.logged, self.true = [], []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.true.append(float(torch.nn.utils.get_total_norm(grads)))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.logged.append(float(trainer.callback_metrics["train/grad_norm"]))

    norms = Norms()
    fit_tiny(tmp_path, corpus, [*([NanGuard()] if guarded else []), norms], 3, **clip)
    assert norms.logged == pytest.approx(norms.true, rel=1e-6) and len(norms.logged) == 3
