"""Inputs as the Triton kernels read them."""

from __future__ import annotations

from torch import Tensor


def last_dim_contiguous(t: Tensor) -> Tensor:
    """``t`` itself when its last dimension has unit stride (any other strides: a column slice of a wider tensor needs
    no copy), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def stride_unit(u: Tensor) -> int:
    """Largest power of two, up to 16 bytes' worth of elements, dividing u's (or grad u's) batch and row strides.

    Triton sees only whether an integer argument is divisible by 16; u's row stride in the model (in_proj's width,
    e.g. 3352) often is not, and then its loads are not vectorized. Strides passed in these units and multiplied
    back by a constexpr let it prove 16-byte aligned rows.
    """
    unit = 16 // u.element_size()
    while u.stride(0) % unit or u.stride(1) % unit:
        unit //= 2
    return unit
