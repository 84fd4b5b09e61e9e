"""The dtype autocast computes matmuls in, where it is on."""

from __future__ import annotations

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """Autocast's dtype for ``device_type`` ("cuda", "cpu") when it is on there, else None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
