"""mamba_ssm's chunked SSD kernels under our own autograd Function, so their backward writes grad x, B and C into
the conv split's gradient buffer (grad_slots.py), as mamba_ssm's fused path hands them its one buffer.

The forward and backward are the calls ``mamba_chunk_scan_combined`` makes (its module's
``_mamba_chunk_scan_combined_fwd`` / ``_bwd``, the entry points mamba_ssm's own fused path uses); the backward takes
the buffers as its ``dx``, ``dB``, ``dC`` arguments. Where those entry points do not import (another mamba_ssm),
backend.ssd calls the public function and the split copies the gradients in.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

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
    """(y, final state) of mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D, initial_states, seq_idx) with dt
    already positive; saves what its Function saves."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D, initial_states, seq_idx, slots):
        fwd, _ = entries()
        y, _y_x, _dt, _dA_cumsum, _states, final_states, *_ = fwd(
            x, dt, A, B, C, chunk_size, D=D, initial_states=initial_states, seq_idx=seq_idx
        )
        ctx.save_for_backward(y, x, dt, A, B, C, D, initial_states, seq_idx)
        ctx.chunk_size, ctx.slots = chunk_size, slots
        ctx.set_materialize_grads(False)  # an unused final state sends None, not zeros through the state backward
        return y, final_states

    @staticmethod
    def backward(ctx, dy, dfinal_states):
        y, x, dt, A, B, C, D, initial_states, seq_idx = ctx.saved_tensors
        _, bwd = entries()
        dy = torch.zeros_like(y) if dy is None else dy
        dx, dB, dC = (claim(slot, t.dtype) for slot, t in zip(ctx.slots, (x, B, C)))
        dx, ddt, dA, dB, dC, dD, _dz, _ddt_bias, dinitial = bwd(
            dy, x, dt, A, B, C, y, ctx.chunk_size, D=D, initial_states=initial_states, dfinal_states=dfinal_states,
            seq_idx=seq_idx, dx=dx, dB=dB, dC=dC,
        )
        return dx, ddt, dA, dB, dC, None, dD, dinitial, None, None


def chunk_scan(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Tensor | None = None,
    initial_states: Tensor | None = None, seq_idx: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """mamba_chunk_scan_combined(..., dt_softplus=False, return_final_states=True), arguments as it takes them
    (seq_idx int32 numbered from 0 per row); x, B, C pieces of a grad_slots split get their gradients written in
    place. Needs :func:`entries`."""
    return _ChunkScan.apply(x, dt, A, B, C, chunk_size, D, initial_states, seq_idx,
                            tuple(slot_of(t) for t in (x, B, C)))
