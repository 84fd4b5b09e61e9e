"""Tokens per second and MFU through Lightning's own ThroughputMonitor."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor


def _batch_size(batch: dict) -> int:
    return batch["input_ids"].size(0)


def _tokens(batch: dict) -> int:
    return batch["input_ids"].numel()


class TokenThroughputMonitor(ThroughputMonitor):
    """ThroughputMonitor for token batches: ``train/items_per_sec`` is tokens/s, ``train/device/mfu`` the MFU
    (FLOPs come from the LightningModule's ``flops_per_batch``)."""

    def __init__(self, window_size: int = 20, **kwargs: Any):
        super().__init__(batch_size_fn=_batch_size, length_fn=_tokens, window_size=window_size, **kwargs)
