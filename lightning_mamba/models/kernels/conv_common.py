"""What both Triton convs (conv_triton.py's tiles, conv_scan_triton.py's walk through time) take and give back:
their kernels' arguments, grad u's buffer, and grad weight and bias from the programs' partial sums."""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import stride_unit


def kernel_args(u: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor | None, seq_idx: Tensor | None,
                tap_rows: int | None = None):
    """Pointers (u stands in for absent optional tensors), strides and constexpr flags for a conv's kernels. The taps
    are fp32 (tap_rows, d), one contiguous row of channels per tap, the kernel's k taps last (``tap_rows`` > k: the
    rows before them are zeros, for kernels whose window is wider than k; None: k rows)."""
    d, k = weight.size(0), weight.size(-1)
    state = u if conv_state is None else conv_state.transpose(1, 2).contiguous()  # (b, k-1, d), tiny
    taps = weight[:, 0, :].t().float().contiguous()
    if tap_rows is not None and tap_rows > k:
        taps = torch.cat([taps.new_zeros(tap_rows - k, d), taps])
    unit = stride_unit(u)
    ptrs = (u, taps, u if bias is None else bias, state, u if seq_idx is None else seq_idx)
    strides = (u.stride(0) // unit, u.stride(1) // unit, 0 if conv_state is None else state.stride(0),
               *((0, 0) if seq_idx is None else seq_idx.stride()))
    flags = dict(K=k, HAS_BIAS=bias is not None, HAS_STATE=conv_state is not None, HAS_SEQ=seq_idx is not None,
                 U_UNIT=unit)
    return ptrs, strides, flags


def grad_u_buffer(grad_u: Tensor | None, u: Tensor) -> Tensor:
    """``grad_u`` when the kernels can write it (unit channel stride: a split's gradient slot), else a new one."""
    return grad_u if grad_u is not None and grad_u.stride(-1) == 1 else torch.empty(u.shape, device=u.device,
                                                                                     dtype=u.dtype)


def partial_sums(n_parts: int, tap_rows: int, d: int, device) -> Tensor:
    """The programs' partial sums of grad weight and bias in one buffer (n_parts, tap_rows + 1, d): a program's slot
    holds its tap rows, then its bias row, so one reduction sums both (each cost ~9 us on an H100 at the study's cells,
    against ~65 us for the walk's backward kernel before it). Every program writes its whole slot: no fill."""
    return torch.empty(n_parts, tap_rows + 1, d, device=device, dtype=torch.float32)


def weight_bias_grads(parts: Tensor, weight: Tensor, bias: Tensor | None):
    """grad weight (d, 1, k) and bias from the programs' partial sums (``partial_sums``: tap rows, whose last k are
    the kernel's taps, then the bias row)."""
    d, k = weight.size(0), weight.size(-1)
    sums = parts.sum(0)
    grad_w = sums[:-1][-k:].t().reshape(d, 1, k).to(weight.dtype)
    return grad_w, None if bias is None else sums[-1].to(bias.dtype)
