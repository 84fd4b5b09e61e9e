"""Where the Triton-kernel tests run: CUDA when available, else Triton's CPU interpreter when TRITON_INTERPRET=1
(small shapes), else they skip (CI has no triton). The CUDA-only ones (realistic shapes, mamba_ssm) carry
``pytest.mark.gpu`` besides ``needs_triton``: tests/conftest.py skips them without CUDA."""

import os

import pytest
import torch


def _device() -> tuple[str | None, str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return None, "triton is not installed"
    if torch.cuda.is_available():
        return "cuda", ""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu", ""
    return None, "no CUDA, and TRITON_INTERPRET=1 is not set for Triton's CPU interpreter"


DEVICE, WHY_NOT = _device()
needs_triton = pytest.mark.skipif(DEVICE is None, reason=WHY_NOT or "")
