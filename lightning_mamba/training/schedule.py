"""Learning-rate schedules as multipliers of the peak lr: warm-up + WSD (the paper's) or cosine."""

from __future__ import annotations

import math

SCHEDULES = ("wsd", "cosine", "constant")


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int,
    schedule: str = "wsd",
    decay_fraction: float = 0.1,
    min_lr_ratio: float = 0.0,
) -> float:
    """Multiplier at optimizer step ``step`` (0-based).

    wsd: linear warm-up, constant, then linear decay to ``min_lr_ratio`` over the last
    ``decay_fraction`` of the steps. cosine: warm-up, then cosine to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    total_steps = max(total_steps, warmup_steps + 1)
    if schedule == "wsd":
        decay_steps = max(1, int(round(decay_fraction * total_steps)))
        decay_start = max(warmup_steps, total_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / max(1, total_steps - decay_start))
        return 1.0 - (1.0 - min_lr_ratio) * progress
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
