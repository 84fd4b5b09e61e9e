"""What the DDP tests record from a real run (named in its config by class path), and the run's config."""

import os

import lightning as L
import torch
import yaml


class RecordSteps(L.Callback):
    """Per rank and step, into ``out/rank<r>.pt``: the batch trained on (input_ids) and the flat gradient the
    optimizer is about to use (after DDP's all-reduce, before clipping); the initial and the final parameters."""

    def __init__(self, out: str):
        self.out = out
        self.batches, self.grads, self.initial = [], [], None

    def on_train_start(self, trainer, pl_module):
        self.initial = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch["input_ids"].clone())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(torch.cat([p.grad.detach().flatten() for _, p in pl_module.named_parameters()]))

    def on_train_end(self, trainer, pl_module):
        os.makedirs(self.out, exist_ok=True)
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        record = {"world_size": trainer.world_size, "rank": trainer.global_rank, "step": trainer.global_step,
                  "batches": self.batches, "grads": self.grads, "initial": self.initial, "params": params}
        torch.save(record, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


def write_config(path: str, corpus: str, cache_dir: str, record_dir: str, batch_size: int, max_steps: int) -> str:
    """A tiny one-process CPU run for `lightning-mamba fit` (add `--trainer configs/trainer/ddp_cpu.yaml` for DDP):
    byte tokenizer, fp32, a gradient clip that acts, no validation, no logger, no checkpoints."""
    trainer = {
        "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "precision": "32-true",
        "gradient_clip_val": 0.1, "limit_val_batches": 0, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False,
        "default_root_dir": os.path.dirname(os.path.abspath(path)),  # where the CLI writes config.yaml
        "callbacks": [{"class_path": "tests.scale.helpers.RecordSteps", "init_args": {"out": record_dir}}],
    }
    config = {
        "seed_everything": 0,
        "trainer": trainer,
        "model": {"d_model": 32, "n_layer": 2, "d_state": 16, "headdim": 16, "chunk_size": 32, "backend": "torch",
                  "warmup_steps": 2},
        "data": {"source": corpus, "tokenizer": "byte", "seq_len": 64, "batch_size": batch_size,
                 "cache_dir": cache_dir},
    }
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path
