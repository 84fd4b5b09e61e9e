"""mamba_ssm's chunked SSD kernels under our own autograd Function, so their backward writes grad x, B and C into
the conv split's gradient buffer and grad dt_raw into in_proj's (grad_slots.py), as mamba_ssm's fused path hands
them its one buffer. Given ``dt_bias``, the kernels take the raw dt and apply dt_bias, the softplus and dt_limit
themselves (mamba_ssm's dt_softplus, as its fused path): no elementwise passes over dt either way.

The forward and backward are the calls ``mamba_chunk_scan_combined`` makes (its module's
``_mamba_chunk_scan_combined_fwd`` / ``_bwd``, the entry points mamba_ssm's own fused path uses); the backward takes
the buffers as its ``dx``, ``dB``, ``dC`` arguments. Where those entry points do not import (another mamba_ssm),
backend.ssd calls the public function and the split copies the gradients in.

mamba_ssm's backward first recomputes what its forward had: the per-chunk states (a chunk-state and a
state-passing kernel over every chunk, head and d_state), dt and its cumulative sums. With ``save_states`` the
forward keeps them instead (the states in the inputs' dtype, as its output used them: b x chunks x heads x headdim
x d_state values a layer) and :func:`_backward_from_states` runs the rest of mamba_ssm's backward, kernel for
kernel, on them: a memory-for-time trade (SSMConfig.save_chunk_states). The one numeric difference: the states'
own gradient term (the state-passing backward's sum of states x their gradient) reads them in that dtype, where
mamba_ssm's recomputation has them in fp32; in fp32 the two backwards agree exactly.
"""

from __future__ import annotations

import functools
import types

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


@functools.cache
def _stages() -> types.SimpleNamespace:
    """The kernels' launchers that mamba_ssm's backward calls after its recomputation (the names it imports)."""
    from mamba_ssm.ops.triton import ssd_combined as m

    names = ("_bmm_chunk_fwd", "_bmm_chunk_bwd", "_chunk_cumsum_bwd", "_chunk_scan_bwd_dstates", "_state_passing_bwd",
             "_chunk_scan_chunk_state_bwd_dx", "_chunk_state_bwd_db", "_chunk_scan_bwd_dC", "_chunk_scan_bwd_dcb",
             "_chunk_scan_bwd_ddAcs_stable")
    return types.SimpleNamespace(**{n.lstrip("_"): getattr(m, n) for n in names})


def _backward_from_states(dy, x, dt_raw, A, B, C, chunk_size, D, dt_bias, has_initial, dfinal, seq_idx, dt_limit,
                          dt, dA_cumsum, states, dx, ddt_raw, dB, dC):
    """mamba_ssm's _mamba_chunk_scan_combined_bwd without z, from the forward's dt (b, h, chunks, chunk), dA_cumsum
    and states (b, chunks, h, headdim, d_state) instead of recomputing them. Same kernels, same order."""
    k = _stages()
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    d_state = B.size(-1)
    flat = lambda t: None if t is None else t.flatten(-2)  # noqa: E731  (..., headdim, d_state) -> (..., headdim * d_state)
    CB = k.bmm_chunk_fwd(C, B, chunk_size, seq_idx=seq_idx, output_dtype=torch.float32)
    # the states' gradients in fp32, as mamba_ssm's backward has them (its recomputed states are fp32)
    dstates = k.chunk_scan_bwd_dstates(C, dA_cumsum, dy, seq_idx=seq_idx, dtype=torch.float32)
    dstates, ddA_chunk_cumsum, dinitial, states = k.state_passing_bwd(
        flat(states), dA_cumsum[:, :, :, -1], flat(dstates), dfinal_states=flat(dfinal), seq_idx=seq_idx,
        has_initial_states=has_initial, dstates_dtype=x.dtype, states_dtype=x.dtype, chunk_size=chunk_size,
    )
    states, dstates = (t.unflatten(-1, (-1, d_state)) for t in (states, dstates))
    dinitial = None if dinitial is None else dinitial.unflatten(-1, (-1, d_state))
    dx, ddt, dD = k.chunk_scan_chunk_state_bwd_dx(x, dt, dA_cumsum, B, CB, dy, dstates, D=D, seq_idx=seq_idx, dx=dx)
    dB_part, ddA_next = k.chunk_state_bwd_db(x, dt, dA_cumsum, dstates, seq_idx=seq_idx, B=B, ngroups=B.size(2))
    dC_part, ddA_cumsum_prev = k.chunk_scan_bwd_dC(states.to(x.dtype), dA_cumsum, dy, seq_idx=seq_idx, C=C,
                                                   ngroups=C.size(2))
    dCB = k.chunk_scan_bwd_dcb(x, dt, dA_cumsum, dy, seq_idx=seq_idx, ngroups=B.size(2)).to(CB.dtype)
    k.bmm_chunk_bwd(C, dCB, residual=dB_part, out=dB)
    k.bmm_chunk_bwd(B, dCB.transpose(-1, -2), residual=dC_part, out=dC)
    ddA_cumsum_prev[..., -1] += ddA_chunk_cumsum
    ddA = k.chunk_scan_bwd_ddAcs_stable(x, dt, dA_cumsum, dy, CB)
    ddA += ddA_next + ddA_cumsum_prev.flip([-1]).cumsum(dim=-1).flip([-1])
    ddt_raw, dA, ddt_bias = k.chunk_cumsum_bwd(ddA, ddt, dt_raw, A, dt_bias=dt_bias, dt_softplus=dt_bias is not None,
                                               dt_limit=dt_limit, ddt=ddt_raw)
    return dx, ddt_raw, dA, dB, dC, dD, ddt_bias, dinitial


class _ChunkScan(torch.autograd.Function):
    """(y, final state) of mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D, dt_bias, initial_states, seq_idx,
    dt_softplus=dt_bias is not None, dt_limit); saves what its Function saves, and with ``save_states`` the
    forward's states, dt and dA_cumsum too."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D, dt_bias, initial_states, seq_idx, dt_limit, slots, save_states):
        fwd, _ = entries()
        y, _y_x, dt_chunks, dA_cumsum, states, final_states, *_ = fwd(
            x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx,
            dt_softplus=dt_bias is not None, dt_limit=dt_limit,
        )
        kept = (dt_chunks, dA_cumsum, states) if save_states else ()
        ctx.save_for_backward(y, x, dt, A, B, C, D, dt_bias, initial_states, seq_idx, *kept)
        ctx.chunk_size, ctx.dt_limit, ctx.slots = chunk_size, dt_limit, slots
        ctx.set_materialize_grads(False)  # an unused final state sends None, not zeros through the state backward
        return y, final_states

    @staticmethod
    def backward(ctx, dy, dfinal_states):
        y, x, dt, A, B, C, D, dt_bias, initial_states, seq_idx, *kept = ctx.saved_tensors
        dy = torch.zeros_like(y) if dy is None else dy
        dx, ddt, dB, dC = (claim(slot, t.dtype) for slot, t in zip(ctx.slots, (x, dt, B, C)))
        if kept:
            dx, ddt, dA, dB, dC, dD, ddt_bias, dinitial = _backward_from_states(
                dy, x, dt, A, B, C, ctx.chunk_size, D, dt_bias, initial_states is not None, dfinal_states, seq_idx,
                ctx.dt_limit, *kept, dx=dx, ddt_raw=ddt,
                dB=dB if dB is not None else torch.empty_like(B), dC=dC if dC is not None else torch.empty_like(C),
            )
        else:
            _, bwd = entries()
            dx, ddt, dA, dB, dC, dD, _dz, ddt_bias, dinitial = bwd(
                dy, x, dt, A, B, C, y, ctx.chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_states,
                dfinal_states=dfinal_states, seq_idx=seq_idx, dt_softplus=dt_bias is not None, dt_limit=ctx.dt_limit,
                dx=dx, ddt=ddt, dB=dB, dC=dC,
            )
        return dx, ddt, dA, dB, dC, None, dD, ddt_bias, dinitial, None, None, None, None


def chunk_scan(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Tensor | None = None,
    initial_states: Tensor | None = None, seq_idx: Tensor | None = None, dt_bias: Tensor | None = None,
    dt_limit: tuple[float, float] = NO_DT_LIMIT, save_states: bool = False,
) -> tuple[Tensor, Tensor]:
    """mamba_chunk_scan_combined(..., dt_softplus=dt_bias is not None, return_final_states=True), arguments as it
    takes them (seq_idx int32 numbered from 0 per row; dt positive unless dt_bias is given); x, dt, B, C pieces of
    a grad_slots split get their gradients written in place. ``save_states``: the backward reuses the forward's
    states instead of recomputing them (more memory, less time). Needs :func:`entries`."""
    return _ChunkScan.apply(x, dt, A, B, C, chunk_size, D, dt_bias, initial_states, seq_idx, tuple(dt_limit),
                            tuple(slot_of(t) for t in (x, dt, B, C)), save_states)
