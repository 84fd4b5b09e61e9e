"""TokenThroughputMonitor in a real Trainer: tokens/s and FLOPs/s logged at the logging steps only, counting every
batch in between, and validation kept out of the training clock."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_mamba.callbacks import TokenThroughputMonitor
from lightning_mamba.training.module import MambaLitModule


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, seq_len=32):
        self.ids = torch.randint(0, 64, (n, seq_len + 1), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i, :-1], "labels": self.ids[i, 1:]}


@pytest.mark.parametrize("log_every,steps", [(3, [8, 11]), (4, [7, 11])])
def test_rates_at_logging_steps_with_every_batch_counted(tmp_path, log_every, steps):
    """Validation every 6 steps: on a logging step (log_every 3) or between two (4: the batches since step 4 are
    timed when validation starts, so the window holds 4, 6, 8, 12)."""
    torch.manual_seed(0)
    module = MambaLitModule(d_model=32, n_layer=2, d_state=16, headdim=16, vocab_size=64, chunk_size=16,
                            warmup_steps=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=12, log_every_n_steps=log_every, val_check_interval=6,
                        limit_val_batches=2, num_sanity_val_steps=0, logger=CSVLogger(tmp_path, name="run"),
                        callbacks=[TokenThroughputMonitor()], enable_checkpointing=False, enable_progress_bar=False)
    loader = lambda: torch.utils.data.DataLoader(Tokens(), batch_size=4)  # noqa: E731
    trainer.fit(module, loader(), loader())
    rows = list(csv.DictReader(open(f"{trainer.log_dir}/metrics.csv")))
    rated = [r for r in rows if r.get("train/device/items_per_sec")]
    # a window of 3 timings: rates from the third timing on, logged at logging steps (as step - 1 by Lightning)
    assert [int(r["step"]) for r in rated] == steps
    for r in rated:
        tokens_per_sec, flops_per_sec = float(r["train/device/items_per_sec"]), float(r["train/device/flops_per_sec"])
        assert tokens_per_sec > 0
        # FLOPs per token: every batch's FLOPs counted, not one batch per timing
        assert flops_per_sec / tokens_per_sec == pytest.approx(module.flops_per_batch / (4 * 32), rel=1e-9)
        assert float(r["train/device/batches_per_sec"]) * 4 * 32 == pytest.approx(tokens_per_sec, rel=1e-9)
