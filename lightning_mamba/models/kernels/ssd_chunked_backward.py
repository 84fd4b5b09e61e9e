"""The backward of mamba_ssm's chunked SSD scan: its kernels, in the order and with the arguments of its
``_mamba_chunk_scan_combined_bwd`` (without z), launched from here for two changes that leave every value as it is,
and one that sums the same terms in another order (:func:`_decay_grad`: the decay's gradient in one kernel):

- The states entering each chunk, dt and dt's cumulative sums (and the scores C B^T, where it kept them) come from
  the forward when it kept them (``saved``: SSMConfig.save_chunk_states), else they are recomputed as mamba_ssm
  recomputes them.
- Three of its kernels (grad B, grad C, grad CB) write fp32 results per split of a group's heads, which its
  launchers then sum over the splits. A program takes ceil(batch x chunks x heads / SMs) of a group's heads, so
  once batch x chunks x groups is about the SM count or more there is one split and that sum is a copy (the 130m
  step: 16 x 8 chunks x 24 heads / 132 SMs -> 24 heads a program, all of them; the study's cells too): the
  launchers here hand the one split on as a view. Three reduction passes a layer fewer (grad B and C: batch x
  seq_len x d_state fp32 each; grad CB: batch x chunks x chunk_size^2 fp32).

Call only where ssd_chunked_mamba.entries() imports (mamba_ssm 2.3.x).
"""

from __future__ import annotations

import functools
import math
import types

import torch
from torch import Tensor

from .layout import last_dim_contiguous

try:  # CI machines have no triton: the module must still import
    import triton
    import triton.language as tl
except ImportError:
    triton = None


@functools.cache
def _mamba():
    """mamba_ssm's SSD launchers and kernels used here (their module-level names)."""
    import triton
    from mamba_ssm.ops.triton import ssd_chunk_scan, ssd_chunk_state, ssd_combined
    from mamba_ssm.utils import determinism

    return types.SimpleNamespace(combined=ssd_combined, scan=ssd_chunk_scan, state=ssd_chunk_state,
                                 determinism=determinism, triton=triton)


def _splits(batch: int, nchunks: int, nheads: int, ngroups: int, device) -> tuple[int, int]:
    """(heads per program, splits of a group's heads), as mamba_ssm's grad B / C / CB launchers choose them."""
    per_group = nheads // ngroups
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    per_program = max(min(math.ceil(batch * nchunks * nheads / sm_count), per_group), 1)
    return per_program, -(-per_group // per_program)


def _grid(m, rows: int, cols: int, chunks: int, splits: int):
    """The launch grid of a grad B / C / CB kernel: tiles of (rows, cols), batch x chunks, splits x groups."""
    return lambda META: (m.triton.cdiv(rows, META["BLOCK_SIZE_M"]) * m.triton.cdiv(cols, META["BLOCK_SIZE_N"]),
                         chunks, splits)


def _sum_splits(t: Tensor) -> Tensor:
    """The sum over dimension 2 (the splits); one split is returned as a view, not copied by a reduction."""
    return t.squeeze(2) if t.size(2) == 1 else t.sum(2)


def _seq_strides(seq_idx: Tensor | None) -> tuple[int, int]:
    return (0, 0) if seq_idx is None else (seq_idx.stride(0), seq_idx.stride(1))


def _dt_strides(t: Tensor) -> tuple[int, int, int, int]:
    """A (batch, heads, chunks, chunk) tensor's strides in the kernels' order (batch, chunk, head, position)."""
    return t.stride(0), t.stride(2), t.stride(1), t.stride(3)


def _bc_buffers(m, device, batch, seqlen, nheads, nchunks, chunk_size, dstate, ngroups, min_block_n):
    """What the grad B and grad C launchers set up alike: (deterministic, the decay gradient's workspace and its tile
    stride, heads per program, the fp32 (batch, seqlen, splits, groups, d_state) output, the grid)."""
    deterministic = m.determinism.use_deterministic_mode()
    ddA, stride_tile = m.determinism.alloc_tile_workspace(
        (batch, nheads, nchunks, chunk_size), math.ceil(dstate / min_block_n), torch.float32, device, deterministic,
        zero_init=True)
    per_program, nsplits = _splits(batch, nchunks, nheads, ngroups, device)
    out = torch.empty(batch, seqlen, nsplits, ngroups, dstate, device=device, dtype=torch.float32)
    return deterministic, ddA, stride_tile, per_program, out, _grid(m, chunk_size, dstate, batch * nchunks,
                                                                    nsplits * ngroups)


def _grad_b(x, dt, dA_cumsum, dstates, seq_idx, B, ngroups):
    """mamba_ssm's _chunk_state_bwd_db(x, dt, dA_cumsum, dstates, seq_idx, B=B, ngroups): (grad B in fp32, the
    decay's gradient from it before its cumulative sum over each chunk)."""
    m = _mamba()
    batch, seqlen, nheads, headdim = x.shape
    _, _, nchunks, chunk_size = dt.shape
    dstate = dstates.shape[-1]
    deterministic, ddA, stride_tile, per_program, dB, grid = _bc_buffers(
        m, x.device, batch, seqlen, nheads, nchunks, chunk_size, dstate, ngroups, m.state._CHUNK_STATE_BWD_DB_MIN_BLOCK_N)
    with torch.cuda.device(x.device.index):
        m.state._chunk_state_bwd_db_kernel[grid](
            x, dstates, B, dt, dA_cumsum, seq_idx, dB, ddA, chunk_size, dstate, headdim, batch, seqlen, nheads,
            per_program, ngroups, *x.stride(), *dstates.stride(), *B.stride(), *_dt_strides(dt),
            *_dt_strides(dA_cumsum), *_seq_strides(seq_idx), *dB.stride(), *_dt_strides(ddA), stride_tile,
            HAS_DDA_CS=True, HAS_SEQ_IDX=seq_idx is not None, DETERMINISTIC_REDUCTION=deterministic,
            BLOCK_SIZE_K=max(m.triton.next_power_of_2(headdim), 16),
        )
    # its cumulative sum is taken in _decay_grad (mamba_ssm's launcher takes it here)
    return _sum_splits(dB), m.determinism.finalize_tile_workspace(ddA, deterministic)


def _grad_c(prev_states, dA_cumsum, dout, seq_idx, C, ngroups):
    """mamba_ssm's _chunk_scan_bwd_dC(prev_states, dA_cumsum, dout, seq_idx, C=C, ngroups): (grad C in fp32, the
    decay's gradient from it)."""
    m = _mamba()
    batch, nchunks, nheads, headdim, dstate = prev_states.shape
    seqlen = dout.shape[1]
    chunk_size = dA_cumsum.shape[-1]
    deterministic, ddA, stride_tile, per_program, dC, grid = _bc_buffers(
        m, dout.device, batch, seqlen, nheads, nchunks, chunk_size, dstate, ngroups,
        m.scan._CHUNK_SCAN_BWD_DC_MIN_BLOCK_N)
    with torch.cuda.device(dout.device.index):
        m.scan._chunk_scan_bwd_dc_kernel[grid](
            dout, prev_states, C, dA_cumsum, seq_idx, dC, ddA, chunk_size, dstate, headdim, batch, seqlen, nheads,
            per_program, ngroups, *dout.stride(), *prev_states.stride(), *C.stride(), *_dt_strides(dA_cumsum),
            *_seq_strides(seq_idx), *dC.stride(), *_dt_strides(ddA), stride_tile,
            HAS_DDA_CS=True, HAS_SEQ_IDX=seq_idx is not None, DETERMINISTIC_REDUCTION=deterministic,
            BLOCK_SIZE_K=max(m.triton.next_power_of_2(headdim), 16),
        )
    return _sum_splits(dC), m.determinism.finalize_tile_workspace(ddA, deterministic)


def _grad_cb(x, dt, dA_cumsum, dout, seq_idx, ngroups):
    """mamba_ssm's _chunk_scan_bwd_dcb(x, dt, dA_cumsum, dout, seq_idx, ngroups=ngroups), without CB: grad CB
    (batch, chunks, groups, chunk, chunk) in fp32."""
    m = _mamba()
    batch, seqlen, nheads, headdim = x.shape
    _, _, nchunks, chunk_size = dt.shape
    per_program, nsplits = _splits(batch, nchunks, nheads, ngroups, x.device)
    dcb = torch.empty(batch, nchunks, nsplits, ngroups, chunk_size, chunk_size, device=x.device, dtype=torch.float32)
    grid = _grid(m, chunk_size, chunk_size, batch * nchunks, nsplits * ngroups)
    with torch.cuda.device(x.device.index):
        m.scan._chunk_scan_bwd_dcb_kernel[grid](
            x, dout, None, dt, dA_cumsum, seq_idx, dcb, None, chunk_size, headdim, batch, seqlen, nheads,
            per_program, ngroups, *x.stride(), *dout.stride(), 0, 0, 0, 0, 0, *_dt_strides(dt),
            *_dt_strides(dA_cumsum), *_seq_strides(seq_idx), *dcb.stride(), 0, 0, 0, 0, 0,
            HAS_DDA_CS=False, HAS_SEQ_IDX=seq_idx is not None, BLOCK_SIZE_K=max(m.triton.next_power_of_2(headdim), 16),
        )
    return _sum_splits(dcb)


def _decay_grad(x, dt, dA_cumsum, dout, CB, ddA_next, ddA_prev, ddA_chunk):
    """The gradient of dA_cumsum, as mamba_ssm's backward sums it from its parts: _chunk_scan_bwd_ddAcs_stable's
    (summed over its row blocks) + the cumulative sum of grad B's part over each chunk + the reverse cumulative sum of
    grad C's part, whose last position also takes state passing's part (``ddA_chunk``: batch x heads x chunks). Its
    kernel is launched here so its row blocks are summed in one Triton pass with the rest: one kernel where
    mamba_ssm's launchers and sums make eight (the study's cells: ~30 small kernels a step fewer). The same sums in
    another order: equal to rounding."""
    m = _mamba()
    batch, seqlen, nheads, headdim = x.shape
    _, _, nchunks, chunk_size = dt.shape
    kernel = m.scan._chunk_scan_bwd_ddAcs_stable_kernel
    parts = torch.empty(batch, nheads, nchunks, m.triton.cdiv(chunk_size, 32), chunk_size, device=x.device,
                        dtype=torch.float32)  # a part per block of rows, as mamba_ssm allocates them (blocks >= 32)
    grid = lambda META: (m.triton.cdiv(chunk_size, META["BLOCK_SIZE_M"]), batch * nchunks, nheads)  # noqa: E731
    with torch.cuda.device(x.device.index):
        kernel[grid](
            x, dout, dt, dA_cumsum, CB, parts, chunk_size, headdim, batch, seqlen, nheads // CB.size(2),
            *x.stride(), *dout.stride(), *_dt_strides(dt), *_dt_strides(dA_cumsum), *CB.stride(),
            parts.stride(0), parts.stride(2), parts.stride(1), parts.stride(3), parts.stride(4),
            BLOCK_SIZE_K=max(m.triton.next_power_of_2(headdim), 16),
        )
    n_parts = m.triton.cdiv(chunk_size, kernel.best_config.kwargs["BLOCK_SIZE_M"])
    ddA_next, ddA_prev, ddA_chunk = (t.contiguous() for t in (ddA_next, ddA_prev, ddA_chunk))
    ddA = torch.empty(batch, nheads, nchunks, chunk_size, device=x.device, dtype=torch.float32)
    rows = batch * nheads * nchunks
    block_c = m.triton.next_power_of_2(chunk_size)
    block_r = max(1, 1024 // block_c)
    with torch.cuda.device(x.device.index):
        _decay_grad_kernel[(m.triton.cdiv(rows, block_r),)](
            ddA, parts, ddA_next, ddA_prev, ddA_chunk, rows, n_parts, chunk_size, parts.stride(2), parts.stride(3),
            BLOCK_R=block_r, BLOCK_C=block_c,
        )
    return ddA


if triton is not None:

    @triton.jit
    def _decay_grad_kernel(out_ptr, parts_ptr, next_ptr, prev_ptr, chunk_ptr, n_rows, n_parts, chunk_size,
                           stride_parts_row, stride_parts_part, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # rows: (batch, head, chunk) flattened; out, next and prev are contiguous (rows, chunk_size)
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        mask = (rows < n_rows)[:, None] & (cols < chunk_size)[None, :]
        at = rows[:, None] * chunk_size + cols[None, :]
        from_scan = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for k in range(n_parts):
            from_scan += tl.load(parts_ptr + rows[:, None] * stride_parts_row + k * stride_parts_part + cols[None, :],
                                 mask=mask, other=0.0)
        from_b = tl.load(next_ptr + at, mask=mask, other=0.0)
        from_c = tl.load(prev_ptr + at, mask=mask, other=0.0)
        last = tl.load(chunk_ptr + rows, mask=rows < n_rows, other=0.0)
        from_c += tl.where(cols[None, :] == chunk_size - 1, last[:, None], 0.0)
        total = from_scan + (tl.cumsum(from_b, axis=1) + tl.cumsum(from_c, axis=1, reverse=True))
        tl.store(out_ptr + at, total, mask=mask)


def chunk_scan_backward(dy, x, dt_raw, A, B, C, chunk_size, D, dt_bias, initial_states, dfinal, seq_idx, dt_limit,
                        saved=None, dx=None, ddt_raw=None, dB=None, dC=None):
    """Gradients (x, dt_raw, A, B, C, D, dt_bias, initial_states) of mamba_ssm's chunked scan (no z), its
    _mamba_chunk_scan_combined_bwd with the same arguments. ``saved``: the forward's (dt, dA_cumsum, states, CB or None)
    to use instead of recomputing them; ``dx``, ``ddt_raw``, ``dB``, ``dC``: where to write those gradients, or None."""
    m = _mamba()
    k = m.combined
    dy = last_dim_contiguous(dy)
    d_state = B.size(-1)
    ngroups = B.size(2)
    softplus = dt_bias is not None

    def flat(t):  # (..., headdim, d_state) -> (..., headdim * d_state), as mamba_ssm hands states to state passing
        return None if t is None else t.flatten(-2)

    def unflat(t):
        return None if t is None else t.unflatten(-1, (-1, d_state))

    if saved is None:  # mamba_ssm's recomputation: the states in fp32
        dA_cumsum, dt = k._chunk_cumsum_fwd(dt_raw, A, chunk_size, dt_bias=dt_bias, dt_softplus=softplus,
                                            dt_limit=dt_limit)
        states = k._chunk_state_fwd(B, x, dt, dA_cumsum, seq_idx=seq_idx, states_in_fp32=True)
        states, _ = k._state_passing_fwd(flat(states), dA_cumsum[:, :, :, -1], initial_states=flat(initial_states),
                                         seq_idx=seq_idx, chunk_size=chunk_size)
        states = unflat(states)
    else:
        dt, dA_cumsum, states, CB = saved
    if saved is None or CB is None:
        CB = k._bmm_chunk_fwd(C, B, chunk_size, seq_idx=seq_idx, output_dtype=torch.float32)
    # the states' gradients in fp32, as mamba_ssm has them (it asks for its recomputed states' dtype, fp32)
    dstates = k._chunk_scan_bwd_dstates(C, dA_cumsum, dy, seq_idx=seq_idx, dtype=torch.float32)
    dstates, ddA_chunk_cumsum, dinitial, states = k._state_passing_bwd(
        flat(states), dA_cumsum[:, :, :, -1], flat(dstates), dfinal_states=flat(dfinal), seq_idx=seq_idx,
        has_initial_states=initial_states is not None, dstates_dtype=x.dtype, states_dtype=x.dtype,
        chunk_size=chunk_size,
    )
    states, dstates, dinitial = unflat(states), unflat(dstates), unflat(dinitial)
    dx, ddt, dD = k._chunk_scan_chunk_state_bwd_dx(x, dt, dA_cumsum, B, CB, dy, dstates, D=D, seq_idx=seq_idx, dx=dx)
    dB_part, ddA_next = _grad_b(x, dt, dA_cumsum, dstates, seq_idx, B, ngroups)
    dC_part, ddA_cumsum_prev = _grad_c(states.to(x.dtype), dA_cumsum, dy, seq_idx, C, ngroups)
    dCB = _grad_cb(x, dt, dA_cumsum, dy, seq_idx, ngroups).to(CB.dtype)
    dB = torch.empty_like(B) if dB is None else dB
    dC = torch.empty_like(C) if dC is None else dC
    k._bmm_chunk_bwd(C, dCB, residual=dB_part, out=dB)
    k._bmm_chunk_bwd(B, dCB.transpose(-1, -2), residual=dC_part, out=dC)
    ddA = _decay_grad(x, dt, dA_cumsum, dy, CB, ddA_next, ddA_cumsum_prev, ddA_chunk_cumsum)
    ddt_raw, dA, ddt_bias = k._chunk_cumsum_bwd(ddA, ddt, dt_raw, A, dt_bias=dt_bias, dt_softplus=softplus,
                                                 dt_limit=dt_limit, ddt=ddt_raw)
    return dx, ddt_raw, dA, dB, dC, dD, ddt_bias, dinitial
