"""mamba_ssm's chunked SSD kernels under our own autograd Function, so their backward writes grad x, B and C into
the conv split's gradient buffer and grad dt_raw into in_proj's (grad_slots.py), as mamba_ssm's fused path hands
them its one buffer. Given ``dt_bias``, the kernels take the raw dt and apply dt_bias, the softplus and dt_limit
themselves (mamba_ssm's dt_softplus, as its fused path): no elementwise passes over dt either way.

The forward and backward are the calls ``mamba_chunk_scan_combined`` makes (its module's
``_mamba_chunk_scan_combined_fwd`` / ``_bwd``, the entry points mamba_ssm's own fused path uses); the backward takes
the buffers as its ``dx``, ``dB``, ``dC`` arguments. Where those entry points do not import (another mamba_ssm),
backend.ssd calls the public function and the split copies the gradients in.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..config import NO_DT_LIMIT
from .grad_slots import claim, slot_of


@functools.cache
def entries():
    """(forward, backward) of mamba_ssm's chunked scan, or None. Call only where mamba_ssm imports (backend.py)."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import _mamba_chunk_scan_combined_bwd, _mamba_chunk_scan_combined_fwd
    except ImportError:
        return None
    return _mamba_chunk_scan_combined_fwd, _mamba_chunk_scan_combined_bwd


class _ChunkScan(torch.autograd.Function):
    """(y, final state) of mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D, dt_bias, initial_states, seq_idx,
    dt_softplus=dt_bias is not None, dt_limit); saves what its Function saves."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D, dt_bias, initial_states, seq_idx, dt_limit, slots):
        fwd, _ = entries()
        y, _y_x, _dt, _dA_cumsum, _states, final_states, *_ = fwd(
            x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx,
            dt_softplus=dt_bias is not None, dt_limit=dt_limit,
        )
        ctx.save_for_backward(y, x, dt, A, B, C, D, dt_bias, initial_states, seq_idx)
        ctx.chunk_size, ctx.dt_limit, ctx.slots = chunk_size, dt_limit, slots
        ctx.set_materialize_grads(False)  # an unused final state sends None, not zeros through the state backward
        return y, final_states

    @staticmethod
    def backward(ctx, dy, dfinal_states):
        y, x, dt, A, B, C, D, dt_bias, initial_states, seq_idx = ctx.saved_tensors
        _, bwd = entries()
        dy = torch.zeros_like(y) if dy is None else dy
        dx, ddt, dB, dC = (claim(slot, t.dtype) for slot, t in zip(ctx.slots, (x, dt, B, C)))
        dx, ddt, dA, dB, dC, dD, _dz, ddt_bias, dinitial = bwd(
            dy, x, dt, A, B, C, y, ctx.chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_states,
            dfinal_states=dfinal_states, seq_idx=seq_idx, dt_softplus=dt_bias is not None, dt_limit=ctx.dt_limit,
            dx=dx, ddt=ddt, dB=dB, dC=dC,
        )
        return dx, ddt, dA, dB, dC, None, dD, ddt_bias, dinitial, None, None, None


def chunk_scan(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Tensor | None = None,
    initial_states: Tensor | None = None, seq_idx: Tensor | None = None, dt_bias: Tensor | None = None,
    dt_limit: tuple[float, float] = NO_DT_LIMIT,
) -> tuple[Tensor, Tensor]:
    """mamba_chunk_scan_combined(..., dt_softplus=dt_bias is not None, return_final_states=True), arguments as it
    takes them (seq_idx int32 numbered from 0 per row; dt positive unless dt_bias is given); x, dt, B, C pieces of
    a grad_slots split get their gradients written in place. Needs :func:`entries`."""
    return _ChunkScan.apply(x, dt, A, B, C, chunk_size, D, dt_bias, initial_states, seq_idx, tuple(dt_limit),
                            tuple(slot_of(t) for t in (x, dt, B, C)))
