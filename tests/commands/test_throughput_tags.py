"""Throughput as the README names it: `lightning-mamba fit` logs tokens/s (train/tokens_per_sec) and, where the
device's dense peak is known, MFU (train/mfu); `make bench` prints '-' with a note, never nan, where a column
cannot be filled."""

import csv
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_mamba.callbacks import TokenThroughputMonitor, throughput as tp
from lightning_mamba.cli import main
from lightning_mamba.training.module import MambaLitModule

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_fit_logs_tokens_per_second_and_no_mfu_on_a_cpu(tmp_path, corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(["fit", "--config", os.path.join(ROOT, "configs/train.yaml"),
          "--model.d_model", "32", "--model.n_layer", "1", "--model.d_state", "16", "--model.headdim", "16",
          "--model.chunk_size", "32", "--model.backend", "torch", "--model.warmup_steps", "2",
          "--data.source", corpus, "--data.tokenizer", "byte", "--data.seq_len", "32", "--data.batch_size", "4",
          "--data.cache_dir", str(tmp_path / "cache"), "--trainer.max_steps", "8", "--trainer.limit_val_batches", "0",
          "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.logger.init_args.name", "t",
          "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "2"])  # configs/train.yaml has the monitor
    acc = EventAccumulator(str(tmp_path / "runs" / "t" / "version_0"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert "train/tokens_per_sec" in tags and "train/mfu" not in tags  # a CPU has no known peak
    rates = [e.value for e in acc.Scalars("train/tokens_per_sec")]
    per_device = [e.value for e in acc.Scalars("train/device/items_per_sec")]
    assert rates == pytest.approx(per_device) and all(r > 0 for r in rates)  # one process: the same number


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = torch.randint(0, 64, (33,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids[:-1], "labels": ids[1:]}


def test_mfu_is_logged_where_the_peak_is_known_and_only_for_training(tmp_path, monkeypatch):
    monkeypatch.setattr(tp, "peak_flops", lambda device, dtype: 1e9)
    module = MambaLitModule(d_model=32, n_layer=1, d_state=16, headdim=16, vocab_size=64, chunk_size=16,
                            warmup_steps=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=8, log_every_n_steps=2, val_check_interval=4,
                        limit_val_batches=4, num_sanity_val_steps=0, logger=CSVLogger(tmp_path, name="run"),
                        callbacks=[TokenThroughputMonitor()], enable_checkpointing=False, enable_progress_bar=False)
    loader = lambda: torch.utils.data.DataLoader(Tokens(), batch_size=4)  # noqa: E731
    trainer.fit(module, loader(), loader())
    rows = list(csv.DictReader(open(f"{trainer.log_dir}/metrics.csv")))
    rated = [r for r in rows if r.get("train/mfu")]
    assert rated
    for r in rated:
        assert float(r["train/mfu"]) == pytest.approx(float(r["train/device/flops_per_sec"]) / 1e9)
        assert float(r["train/tokens_per_sec"]) == pytest.approx(float(r["train/device/items_per_sec"]))
    header = rows[0].keys()
    assert not any(k.startswith("validate/") and ("mfu" in k or "flops" in k) for k in header)  # a training
    # step's FLOPs would make validation's MFU 3x too high


@pytest.mark.parametrize("name,dtype,peak", [
    ("NVIDIA H200", torch.bfloat16, 989.4e12),  # Lightning's table knows only "h200 sxm1"/"nvl1", and sparse
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
])
def test_dense_peaks_of_the_gpus_we_run_on(monkeypatch, name, dtype, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert tp.peak_flops("cuda", dtype) == peak
    assert tp.peak_flops("cpu", dtype) is None


def test_make_bench_prints_dashes_not_nan_on_a_cpu():
    """The command `make bench` runs on a CPU, made tiny: columns a CPU cannot fill are '-', with a note why."""
    line = subprocess.run(["make", "-n", "-s", "bench"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "--device cpu" in line or torch.cuda.is_available()
    out = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--config", "cpu-small", "--device", "cpu",
                          "--steps", "1", "--warmup", "0", "--batch", "1", "--seq_len", "64", "--contenders", "ours"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "nan" not in out.stdout.lower()
    row = next(line for line in out.stdout.splitlines() if line.strip().startswith("ours:"))
    assert row.endswith("peak      - GiB  MFU      -")
    assert "# - peak GiB: peak memory is measured on CUDA only" in out.stdout
    assert "# - MFU: no known peak FLOP/s for CPU" in out.stdout
