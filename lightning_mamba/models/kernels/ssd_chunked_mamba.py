"""mamba_ssm's chunked SSD kernels under our own autograd Function, so their backward writes grad x, B and C into
the conv split's gradient buffer and grad dt_raw into in_proj's (grad_slots.py), as mamba_ssm's fused path hands
them its one buffer. Given ``dt_bias``, the kernels take the raw dt and apply dt_bias, the softplus and dt_limit
themselves (mamba_ssm's dt_softplus, as its fused path): no elementwise passes over dt either way.

The forward is ``_mamba_chunk_scan_combined_fwd`` (the call ``mamba_chunk_scan_combined`` and mamba_ssm's own fused
path make) kernel for kernel, launched from here so it can hand on its scores C B^T; the backward is its
``_mamba_chunk_scan_combined_bwd`` kernel for kernel, launched by ssd_chunked_backward.py, which writes into the
buffers, skips the sums over a single split of heads, sums the decay's gradient in one kernel and, with
``save_states`` (SSMConfig.save_chunk_states), reuses the forward's per-chunk states, dt and dt's cumulative sums
instead of recomputing them: b x chunks x heads x headdim x d_state values a layer kept in the inputs' dtype (as
the forward's output read them) for two passes fewer, and the scores where they are small beside them
(:func:`keeps_cb`). The one numeric difference that brings: the states' own gradient term (state passing's sum of
states x their gradient, in dt's and A's gradients) reads them in that dtype, where the recomputation has them in
fp32; in fp32 the two agree exactly.

Both are written against mamba_ssm 2.3.x (the kernels' argument lists); with another version, or where they do not
import, backend.ssd calls the public function and the split copies the gradients in.
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys
import warnings

import torch
from torch import Tensor

from ..config import NO_DT_LIMIT
from .grad_slots import claim, slot_of
from .layout import last_dim_contiguous
from .overrides import overridden
from .ssd_chunked_backward import _mamba, chunk_scan_backward

TESTED_VERSIONS = ("2.3.",)  # mamba_ssm versions whose kernels' argument lists ssd_chunked_backward.py follows


@functools.cache
def entries():
    """Whether this module's forward and backward can run: mamba_ssm's chunked-scan forward
    (``_mamba_chunk_scan_combined_fwd``, whose kernels :func:`_forward` launches), or None where it does not import or
    mamba_ssm is a version the launchers were not written for (then with a warning). Call only where mamba_ssm
    imports (backend.py)."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import _mamba_chunk_scan_combined_fwd
    except ImportError:
        return None
    try:
        version = importlib.metadata.version("mamba-ssm")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if not version.startswith(TESTED_VERSIONS):
        warnings.warn(f"mamba-ssm {version}: lightning_mamba's chunked-scan backward follows mamba-ssm "
                      f"{', '.join(v + 'x' for v in TESTED_VERSIONS)}; using mamba_ssm's public scan instead (its split "
                      "gradients copied, no save_chunk_states)", stacklevel=2)
        return None
    return _mamba_chunk_scan_combined_fwd


def _forward(x, dt, A, B, C, chunk_size, D, dt_bias, initial_states, seq_idx, dt_limit):
    """``_mamba_chunk_scan_combined_fwd(x, dt, A, B, C, chunk_size, D, dt_bias=dt_bias, initial_states, seq_idx,
    dt_softplus=dt_bias is not None, dt_limit)`` kernel for kernel (no z), launched from here so the forward hands on
    the chunks' scores C B^T it makes too: (y, dt, dA_cumsum, states, final_states, CB)."""
    k = _mamba().combined
    d_state = B.size(-1)
    B, C, x = (last_dim_contiguous(t) for t in (B, C, x))  # as mamba_ssm's forward asks
    D = None if D is None else last_dim_contiguous(D)
    dA_cumsum, dt = k._chunk_cumsum_fwd(dt, A, chunk_size, dt_bias=dt_bias, dt_softplus=dt_bias is not None,
                                        dt_limit=dt_limit)
    states = k._chunk_state_fwd(B, x, dt, dA_cumsum, seq_idx=seq_idx, states_in_fp32=True)
    states, final_states = k._state_passing_fwd(
        states.flatten(-2), dA_cumsum[:, :, :, -1], initial_states=None if initial_states is None else
        initial_states.flatten(-2), seq_idx=seq_idx, chunk_size=chunk_size, out_dtype=C.dtype)
    states, final_states = (t.unflatten(-1, (-1, d_state)) for t in (states, final_states))
    CB = k._bmm_chunk_fwd(C, B, chunk_size, seq_idx=seq_idx, output_dtype=torch.float32)
    y, _ = k._chunk_scan_fwd(CB, x, dt, dA_cumsum, C, states, D=D, seq_idx=seq_idx)
    return y, dt, dA_cumsum, states, final_states, CB


# With save_states the backward also takes the forward's scores C B^T (fp32, batch x chunks x groups x chunk^2) where
# they cost at most this fraction of the kept states' bytes: the study's cells (d_state 512, chunk 128: 1/8), not
# the 130m model (its scores outweigh its states), whose memory target the ~0.8 GB would break. Same values either way.
CB_KEPT_UP_TO = 0.25


def scores_kept(on: bool):
    """Inside ``scores_kept(False)`` the backward makes the scores again everywhere (as mamba_ssm does), so a benchmark
    can time both in one process (benchmarks/cell_throughput.py's ``<contender>_remadescores``)."""
    return overridden(sys.modules[__name__], "CB_KEPT_UP_TO", CB_KEPT_UP_TO if on else 0.0)


def keeps_cb(CB: Tensor, states: Tensor) -> bool:
    """Whether the backward takes the forward's scores ``CB`` rather than making them again (:data:`CB_KEPT_UP_TO`)."""
    return CB.numel() * CB.element_size() <= CB_KEPT_UP_TO * states.numel() * states.element_size()


class _ChunkScan(torch.autograd.Function):
    """(y, final state) of mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D, dt_bias, initial_states, seq_idx,
    dt_softplus=dt_bias is not None, dt_limit); saves what its Function saves, and with ``save_states`` the
    forward's dt, dA_cumsum and states too."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D, dt_bias, initial_states, seq_idx, dt_limit, slots, save_states):
        y, dt_chunks, dA_cumsum, states, final_states, CB = _forward(
            x, dt, A, B, C, chunk_size, D, dt_bias, initial_states, seq_idx, dt_limit)
        kept = (dt_chunks, dA_cumsum, states, CB if keeps_cb(CB, states) else None) if save_states else ()
        ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, initial_states, seq_idx, *kept)
        ctx.chunk_size, ctx.dt_limit, ctx.slots = chunk_size, dt_limit, slots
        ctx.set_materialize_grads(False)  # an unused final state sends None, not zeros through the state backward
        return y, final_states

    @staticmethod
    def backward(ctx, dy, dfinal_states):
        x, dt, A, B, C, D, dt_bias, initial_states, seq_idx, *kept = ctx.saved_tensors
        dy = torch.zeros_like(x) if dy is None else dy
        dx, ddt, dB, dC = (claim(slot, t.dtype) for slot, t in zip(ctx.slots, (x, dt, B, C)))
        dx, ddt, dA, dB, dC, dD, ddt_bias, dinitial = chunk_scan_backward(
            dy, x, dt, A, B, C, ctx.chunk_size, D, dt_bias, initial_states, dfinal_states, seq_idx, ctx.dt_limit,
            saved=tuple(kept) or None, dx=dx, ddt_raw=ddt, dB=dB, dC=dC,
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
