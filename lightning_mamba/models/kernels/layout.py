"""Inputs as the Triton kernels read them."""

from __future__ import annotations

from torch import Tensor


def last_dim_contiguous(t: Tensor) -> Tensor:
    """``t`` itself when its last dimension has unit stride (any other strides: a column slice of a wider tensor needs
    no copy), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()
