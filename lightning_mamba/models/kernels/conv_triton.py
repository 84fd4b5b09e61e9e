"""Fused depthwise causal conv1d + SiLU in Triton, for training on GPU.

``causal_conv1d_silu`` computes ``F.silu(causal_conv1d(u, weight, bias, conv_state, seq_idx)[0])`` and the same
new conv_state as :func:`lightning_mamba.models.conv.causal_conv1d` (same carried-state and ``seq_idx`` rules).
The torch path transposes u to (b, d, l), concatenates the state, runs cuDNN's depthwise conv (slow forward,
grad-input and grad-weight kernels) and transposes back, which costs ~20-25% of a 130M-model training step on
an H200. Here one kernel reads u in place in its (b, l, d) layout (any row stride, so the column slice of
in_proj's output needs no copy) and writes silu(conv). Backward saves u, not the output: one kernel recomputes
the pre-activation, writes grad u, and writes fp32 partial sums of grad weight and grad bias, one per (batch row,
program), that torch then sums (deterministic, no atomics). Short rows (the study's LEN 16-64) get tiles no longer
than the row, and each program takes several batch rows, so that no time is spent on masked-out tiles and the
partial sums stay few. (A two-kernel backward passing
g = dy * silu'(pre) through memory, with far fewer registers, was 22% slower on an H200 and was removed.)
Numerics: accumulation is fp32 with weight and bias read in fp32, while the torch path first casts them to u's
dtype (for bf16 u the results differ at the level of bf16 rounding). Gradients flow to u, weight and bias; conv_state and seq_idx get none.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..conv import carried_inputs
from . import conv_scan_triton
from .conv_common import grad_u_buffer, kernel_args, partial_sums, weight_bias_grads
from .grad_slots import claim, slot_of
from .layout import last_dim_contiguous, stride_unit

try:  # CI machines have no triton: the module must still import
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# Tile sizes (time x channels); channels are the contiguous dimension of u.
FWD_BLOCK_L, FWD_BLOCK_D, FWD_WARPS = 64, 128, 8
BWD_BLOCK_L, BWD_BLOCK_D, BWD_WARPS, BWD_BLOCKS = 32, 64, 4, 4  # BWD_BLOCKS time blocks per program
# The backward of rows that fit one tile (l <= BWD_BLOCK_L): (BLOCK_D, warps, blocks); narrower, lighter programs of
# fewer rows. On an H100 (benchmarks/conv_kernel.py --shape cells --sweep, CUDA-graph time, g gathered) forward +
# backward took 305 / 485 / 879 us at d_state 512 / 1024 / 2048 and LEN 32 / 32 / 16, against 451 / 726 / 1422 us
# with the long-row plan; the 2048 / 16 cell's step ran 1.30x the steps/s.
ONE_TILE_BWD = (32, 2, 2)
MIN_BLOCK_L = 16  # the shortest time tile: rows shorter than a tile take one of their own length (rounded up)
# A row that fits in one backward tile can compute its SiLU gradient g once and take g at the K-1 later times from
# it (tl.gather along time) instead of recomputing the conv and its sigmoid at each lag. Rows of at most this many
# times do (0: none). In the H100 sweep above, gathering made every one-tile plan faster at LEN 16 and 32 (1.02-1.44x).
GATHER_MAX_LEN = 32
# Rows whose length is in SCAN_LENS take conv_scan_triton.py's kernels (time walked in registers, each input read
# once) when their kernel width is 2-4. The whole graphed step against causal_conv1d's kernels, same process (H100,
# benchmarks/cell_throughput.py ..._quadratic,..._quadratic_tritonconv): 296.5 vs 260.9 steps/s at d_state 512 LEN 32,
# but 320.4 vs 343.0 at 256 / 64. Rows of 16 too: at d_state 2048 LEN 16 the walk ran 157.9 steps/s against the
# one-tile plan's 137.1 (separate processes, H100); shorter rows are not measured and follow them.
SCAN_LENS = range(1, 33)


def available() -> bool:
    """True when triton imports and CUDA is available."""
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _inputs_at(
        u_row0, state_row0, start, SHIFT: tl.constexpr, chans, l, d, su_l,
        K: tl.constexpr, HAS_STATE: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        """fp32 inputs at times start + SHIFT + (0..BLOCK_L) x `chans`: u for 0 <= t < l, the state for
        -(K-1) <= t < 0, else 0. state_row0 is this row of the state laid out as u, (K-1, d) contiguous.

        (Every time is start plus a constexpr shift, so equal shifts give identical loads, which the compiler
        merges: the backward's K * K shifted loads become 2K - 1.)
        """
        times = start + SHIFT + tl.arange(0, BLOCK_L)
        chan_ok = (chans < d)[None, :]
        rows = times.to(tl.int64)
        x = tl.load(
            u_row0 + rows[:, None] * su_l + chans[None, :],
            mask=((times >= 0) & (times < l))[:, None] & chan_ok,
            other=0.0,
        ).to(tl.float32)
        if HAS_STATE:
            if start + SHIFT < 0:  # a runtime branch: only the first time block reads the state
                x += tl.load(
                    state_row0 + (rows + K - 1)[:, None] * d + chans[None, :],
                    mask=((times < 0) & (times >= 1 - K))[:, None] & chan_ok,
                    other=0.0,
                ).to(tl.float32)
        return x

    @triton.jit
    def _doc_at(seq_row0, start, SHIFT: tl.constexpr, l, sq_l, BLOCK_L: tl.constexpr):
        """Document ids at times start + SHIFT + (0..BLOCK_L); negative times belong to the document at 0 (the
        carried state's)."""
        times = tl.maximum(start + SHIFT + tl.arange(0, BLOCK_L), 0)
        return tl.load(seq_row0 + times.to(tl.int64) * sq_l, mask=times < l, other=-1)

    @triton.jit
    def _tap_input(
        u_row0, state_row0, seq_row0, start, AT: tl.constexpr, LAG: tl.constexpr, chans, l, d, su_l, sq_l,
        K: tl.constexpr, HAS_STATE: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        """What the tap looking LAG steps back sees from times start + AT + (0..BLOCK_L): the input there, or 0
        where that input belongs to an earlier document."""
        x = _inputs_at(u_row0, state_row0, start, AT - LAG, chans, l, d, su_l, K, HAS_STATE, BLOCK_L)
        if HAS_SEQ:
            doc_then = _doc_at(seq_row0, start, AT - LAG, l, sq_l, BLOCK_L)
            x = tl.where((doc_then == _doc_at(seq_row0, start, AT, l, sq_l, BLOCK_L))[:, None], x, 0.0)
        return x

    @triton.jit
    def _conv_at(
        u_row0, w_ptr, bias_ptr, state_row0, seq_row0, start, AT: tl.constexpr, chans, l, d, su_l, sq_l,
        K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_SEQ: tl.constexpr,
        BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """The convolution before SiLU at times start + AT + (0..BLOCK_L) x `chans`, fp32.

        w_ptr is the weight as a contiguous fp32 (K, d) tensor."""
        chan_ok = chans < d
        acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
        for tap in tl.static_range(K):
            # conv1d is a cross-correlation: the last tap (lag 0) multiplies the current input
            x = _tap_input(
                u_row0, state_row0, seq_row0, start, AT, K - 1 - tap, chans, l, d, su_l, sq_l,
                K, HAS_STATE, HAS_SEQ, BLOCK_L,
            )
            w = tl.load(w_ptr + tap * d + chans, mask=chan_ok, other=0.0)
            acc += w[None, :] * x
        return acc

    @triton.jit
    def _silu_grad(pre, dy):
        """dy * silu'(pre), fp32."""
        sig = tl.sigmoid(pre)
        return dy * sig * (1.0 + pre * (1.0 - sig))

    @triton.jit
    def _silu_grad_at(
        u_row0, w_ptr, bias_ptr, state_row0, seq_row0, dy_row0, start, AT: tl.constexpr, chans, l, d, su_l, sq_l, sy_l,
        K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_SEQ: tl.constexpr,
        BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """g = dy * silu'(pre) at times start + AT + (0..BLOCK_L), pre recomputed there; zero past the end."""
        pre = _conv_at(
            u_row0, w_ptr, bias_ptr, state_row0, seq_row0, start, AT, chans, l, d,
            su_l, sq_l, K, HAS_BIAS, HAS_STATE, HAS_SEQ, BLOCK_L, BLOCK_D,
        )
        times = start + AT + tl.arange(0, BLOCK_L)
        dy = tl.load(
            dy_row0 + times.to(tl.int64)[:, None] * sy_l + chans[None, :],
            mask=(times < l)[:, None] & (chans < d)[None, :],
            other=0.0,
        ).to(tl.float32)
        return _silu_grad(pre, dy)  # dy masked past the end

    @triton.jit
    def _add_wb_sums(
        g, dw, db, u_row0, state_row0, seq_row0, start, chans, l, d, su_l, sq_l,
        K: tl.constexpr, HAS_STATE: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK_L: tl.constexpr, K_POW2: tl.constexpr,
    ):
        """(dw, db) plus this time block's terms: dw[tap] += sum_t g(t) * input(t - lag), db += sum_t g(t), where g
        is at times start + (0..BLOCK_L) (zero past the end) and row `tap` of dw (K_POW2, BLOCK_D) has lag K-1-tap.

        The inputs are _conv_at's (AT=0): called before any store of the block, their loads merge with its."""
        taps = tl.arange(0, K_POW2)
        db += tl.sum(g, axis=0)
        for tap in tl.static_range(K):
            x = _tap_input(
                u_row0, state_row0, seq_row0, start, 0, K - 1 - tap, chans, l, d, su_l, sq_l,
                K, HAS_STATE, HAS_SEQ, BLOCK_L,
            )
            dw += tl.where((taps == tap)[:, None], tl.sum(g * x, axis=0)[None, :], 0.0)
        return dw, db

    @triton.jit
    def _store_wb_sums(part_ptr, dw, db, chans, d, K: tl.constexpr, K_POW2: tl.constexpr):
        """This program's partial sums, in slot (batch rows, program along time) of the parts (., K + 1, d): its K
        tap rows, then its bias row (conv_common.partial_sums)."""
        taps = tl.arange(0, K_POW2)
        chan_ok = chans < d
        part = tl.program_id(2).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
        slot = part_ptr + part * (K + 1) * d
        tl.store(slot + K * d + chans, db, mask=chan_ok)
        tl.store(slot + taps[:, None] * d + chans[None, :], dw, mask=(taps < K)[:, None] & chan_ok[None, :])

    @triton.jit
    def _conv_fwd_kernel(
        u_ptr, w_ptr, bias_ptr, state_ptr, seq_ptr, out_ptr, b, l, d,
        su_b, su_l, ss_b, sq_b, sq_l,
        K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_SEQ: tl.constexpr, U_UNIT: tl.constexpr,
        BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
    ):
        """One (time block, channel block) tile of silu(conv) in each of ROWS batch rows; out is contiguous (b, l, d)."""
        su_b, su_l = su_b * U_UNIT, su_l * U_UNIT  # see layout.stride_unit
        start = tl.program_id(0) * BLOCK_L
        chans = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        times = start + tl.arange(0, BLOCK_L)
        for r in range(ROWS):
            row = tl.program_id(2).to(tl.int64) * ROWS + r
            if row < b:
                pre = _conv_at(
                    u_ptr + row * su_b, w_ptr, bias_ptr, state_ptr + row * ss_b, seq_ptr + row * sq_b, start, 0,
                    chans, l, d, su_l, sq_l, K, HAS_BIAS, HAS_STATE, HAS_SEQ, BLOCK_L, BLOCK_D,
                )
                out = pre * tl.sigmoid(pre)
                offs = (row * l + times.to(tl.int64))[:, None] * d + chans[None, :]
                mask = (times < l)[:, None] & (chans < d)[None, :]
                tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_whole_row(
        u_row0, w_ptr, bias_ptr, state_row0, seq_row0, dy_row0, du_row0, dw, db, chans, l, d, su_l, sq_l, sy_l, sdu_l,
        K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_SEQ: tl.constexpr,
        BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, K_POW2: tl.constexpr,
    ):
        """_bwd_row for a row of l <= BLOCK_L times: g = dy * silu'(pre) once, over the whole row; grad_u(t) =
        sum_lag w[K-1-lag] * g(t+lag), g(t+lag) gathered from g (zero past the row's end, or in a later document)."""
        chan_ok = chans < d
        times = tl.arange(0, BLOCK_L)
        g = _silu_grad_at(
            u_row0, w_ptr, bias_ptr, state_row0, seq_row0, dy_row0, 0, 0, chans, l, d, su_l, sq_l, sy_l,
            K, HAS_BIAS, HAS_STATE, HAS_SEQ, BLOCK_L, BLOCK_D,
        )
        dw, db = _add_wb_sums(
            g, dw, db, u_row0, state_row0, seq_row0, 0, chans, l, d, su_l, sq_l, K, HAS_STATE, HAS_SEQ, BLOCK_L, K_POW2,
        )
        du = tl.load(w_ptr + (K - 1) * d + chans, mask=chan_ok, other=0.0)[None, :] * g
        for lag in tl.static_range(1, K):
            later = times + lag
            g_later = tl.gather(g, tl.broadcast_to(tl.minimum(later, BLOCK_L - 1)[:, None], (BLOCK_L, BLOCK_D)), 0)
            keep = later < l
            if HAS_SEQ:
                keep = keep & (_doc_at(seq_row0, 0, lag, l, sq_l, BLOCK_L) == _doc_at(seq_row0, 0, 0, l, sq_l, BLOCK_L))
            w = tl.load(w_ptr + (K - 1 - lag) * d + chans, mask=chan_ok, other=0.0)
            du += w[None, :] * tl.where(keep[:, None], g_later, 0.0)
        offs = times.to(tl.int64)[:, None] * sdu_l + chans[None, :]
        tl.store(du_row0 + offs, du.to(du_row0.dtype.element_ty), mask=(times < l)[:, None] & chan_ok[None, :])
        return dw, db

    @triton.jit
    def _bwd_row(
        u_row0, w_ptr, bias_ptr, state_row0, seq_row0, dy_row0, du_row0, dw, db, chans, l, d, su_l, sq_l, sy_l, sdu_l,
        K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_SEQ: tl.constexpr,
        BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCKS: tl.constexpr, K_POW2: tl.constexpr,
    ):
        """One batch row's BLOCKS time blocks (from this program's along time): grad u stored, (dw, db) plus their
        terms returned. du_row0 is the row's start in grad u (b, l, d), whose times are sdu_l apart."""
        chan_ok = chans < d
        for block in range(BLOCKS):
            start = (tl.program_id(0) * BLOCKS + block) * BLOCK_L
            times = start + tl.arange(0, BLOCK_L)
            du = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
            # All loads of a block come before its stores, so that equal loads (same shift) can be merged.
            for lag in tl.static_range(K):
                g = _silu_grad_at(
                    u_row0, w_ptr, bias_ptr, state_row0, seq_row0, dy_row0, start, lag, chans, l, d, su_l, sq_l, sy_l,
                    K, HAS_BIAS, HAS_STATE, HAS_SEQ, BLOCK_L, BLOCK_D,
                )
                if lag == 0:
                    dw, db = _add_wb_sums(
                        g, dw, db, u_row0, state_row0, seq_row0, start, chans, l, d, su_l, sq_l,
                        K, HAS_STATE, HAS_SEQ, BLOCK_L, K_POW2,
                    )
                elif HAS_SEQ:
                    doc_later = _doc_at(seq_row0, start, lag, l, sq_l, BLOCK_L)
                    g = tl.where((doc_later == _doc_at(seq_row0, start, 0, l, sq_l, BLOCK_L))[:, None], g, 0.0)
                w = tl.load(w_ptr + (K - 1 - lag) * d + chans, mask=chan_ok, other=0.0)
                du += w[None, :] * g
            offs = times.to(tl.int64)[:, None] * sdu_l + chans[None, :]
            tl.store(du_row0 + offs, du.to(du_row0.dtype.element_ty), mask=(times < l)[:, None] & chan_ok[None, :])
        return dw, db

    @triton.jit
    def _conv_bwd_kernel(
        u_ptr, w_ptr, bias_ptr, state_ptr, seq_ptr, dy_ptr, du_ptr, part_ptr, b, l, d,
        su_b, su_l, ss_b, sq_b, sq_l, sy_b, sy_l, sdu_b, sdu_l,
        K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_SEQ: tl.constexpr, U_UNIT: tl.constexpr,
        BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCKS: tl.constexpr, ROWS: tl.constexpr, K_POW2: tl.constexpr,
        WHOLE_ROW: tl.constexpr, DU_UNIT: tl.constexpr,
    ):
        """BLOCKS consecutive time blocks of grad u in each of ROWS batch rows, and their partial sums of grad weight
        (K, BLOCK_D) and bias.

        g(t) = dy(t) * silu'(pre(t)); grad_u(t) = sum_lag w[K-1-lag] * g(t+lag) (same document, t+lag < l), with
        pre recomputed at the K later times; grad_w[tap] = sum_t g(t) * input(t-lag); grad_b = sum_t g(t).
        """
        su_b, su_l = su_b * U_UNIT, su_l * U_UNIT  # see layout.stride_unit
        sdu_b, sdu_l = sdu_b * DU_UNIT, sdu_l * DU_UNIT
        chans = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dw = tl.zeros((K_POW2, BLOCK_D), dtype=tl.float32)  # row tap: sum over this program's rows and times
        db = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for r in range(ROWS):
            row = tl.program_id(2).to(tl.int64) * ROWS + r
            if row < b:
                if WHOLE_ROW:  # a constexpr: only one of the two is compiled
                    dw, db = _bwd_whole_row(
                        u_ptr + row * su_b, w_ptr, bias_ptr, state_ptr + row * ss_b, seq_ptr + row * sq_b,
                        dy_ptr + row * sy_b, du_ptr + row * sdu_b, dw, db, chans, l, d, su_l, sq_l, sy_l, sdu_l,
                        K, HAS_BIAS, HAS_STATE, HAS_SEQ, BLOCK_L, BLOCK_D, K_POW2,
                    )
                else:
                    dw, db = _bwd_row(
                        u_ptr + row * su_b, w_ptr, bias_ptr, state_ptr + row * ss_b, seq_ptr + row * sq_b,
                        dy_ptr + row * sy_b, du_ptr + row * sdu_b, dw, db, chans, l, d, su_l, sq_l, sy_l, sdu_l,
                        K, HAS_BIAS, HAS_STATE, HAS_SEQ, BLOCK_L, BLOCK_D, BLOCKS, K_POW2,
                    )
        _store_wb_sums(part_ptr, dw, db, chans, d, K, K_POW2)


def backward_plan(l: int) -> tuple[int, int, int]:
    """(BLOCK_D, warps, time blocks per program) of the backward for rows of length l: ONE_TILE_BWD for rows that fit
    one tile, else the long-row plan."""
    return ONE_TILE_BWD if l <= BWD_BLOCK_L else (BWD_BLOCK_D, BWD_WARPS, BWD_BLOCKS)


def time_tiles(l: int, block_l: int, blocks: int) -> tuple[int, int, int]:
    """(time tile, tiles per program, batch rows per program) for rows of length l, given the tile and tiles per
    program that suit long rows. A short row gets a tile no longer than itself (a power of two, at least
    MIN_BLOCK_L) and the program takes as many rows as keep its times at block_l * blocks: at LEN 16 the long-row
    tiles (128 times per backward program) were seven-eighths masked out."""
    tile = min(block_l, max(MIN_BLOCK_L, 1 << max(l - 1, 0).bit_length()))
    tiles = min(blocks, -(-l // tile))
    return tile, tiles, max(1, (block_l * blocks) // (tile * tiles))


def scanned(l: int, k: int) -> bool:
    """Whether rows of length l and kernel width k take the time-walking kernels (SCAN_LENS)."""
    return l in SCAN_LENS and conv_scan_triton.takes(k)


def _forward(u, weight, bias, conv_state, seq_idx) -> Tensor:
    b, l, d = u.shape
    if scanned(l, weight.size(-1)):
        return conv_scan_triton.forward(u, weight, bias, conv_state, seq_idx)
    out = torch.empty(b, l, d, device=u.device, dtype=u.dtype)
    if out.numel() == 0:
        return out
    ptrs, strides, flags = kernel_args(u, weight, bias, conv_state, seq_idx)
    tile, _, rows = time_tiles(l, FWD_BLOCK_L, 1)
    grid = (triton.cdiv(l, tile), triton.cdiv(d, FWD_BLOCK_D), triton.cdiv(b, rows))
    _conv_fwd_kernel[grid](
        *ptrs, out, b, l, d, *strides, **flags, BLOCK_L=tile, BLOCK_D=FWD_BLOCK_D, ROWS=rows, num_warps=FWD_WARPS
    )
    return out


def _backward(grad_out, u, weight, bias, conv_state, seq_idx, grad_u=None) -> tuple[Tensor, Tensor, Tensor | None]:
    """grad u, weight, bias by _conv_bwd_kernel; its per-program partial sums of grad weight and bias summed here.
    ``grad_u``: where to write grad u (b, l, d) with unit channel stride (u's slot of a split's gradient buffer), or
    None (a new contiguous one)."""
    b, l, d = u.shape
    k = weight.size(-1)
    if scanned(l, k):
        return conv_scan_triton.backward(grad_out, u, weight, bias, conv_state, seq_idx, grad_u)
    grad_out = last_dim_contiguous(grad_out)
    block_d, warps, blocks = backward_plan(l)
    tile, tiles, rows = time_tiles(l, BWD_BLOCK_L, blocks)
    grid = (triton.cdiv(l, tile * tiles), triton.cdiv(d, block_d), triton.cdiv(b, rows))
    n_parts = grid[0] * grid[2]  # programs along time and rows: one slot of partial sums each
    grad_u = grad_u_buffer(grad_u, u)
    parts = partial_sums(n_parts, k, d, u.device)  # (a program past l writes zeros in its slot)
    if grad_u.numel() > 0:
        ptrs, strides, flags = kernel_args(u, weight, bias, conv_state, seq_idx)
        du_unit = stride_unit(grad_u)
        dy_strides = grad_out.stride(0), grad_out.stride(1), grad_u.stride(0) // du_unit, grad_u.stride(1) // du_unit
        _conv_bwd_kernel[grid](
            *ptrs, grad_out, grad_u, parts, b, l, d, *strides, *dy_strides, DU_UNIT=du_unit,
            **flags, BLOCK_L=tile, BLOCK_D=block_d, BLOCKS=tiles, ROWS=rows,
            K_POW2=triton.next_power_of_2(k), WHOLE_ROW=tiles == 1 and l <= min(tile, GATHER_MAX_LEN),
            num_warps=warps,
        )
    return grad_u, *weight_bias_grads(parts, weight, bias)


class _CausalConv1dSiLU(torch.autograd.Function):
    """silu(causal depthwise conv) with Triton kernels; saves the inputs and recomputes the rest in backward, which
    writes grad u into u's columns of the split's gradient buffer when u is a piece of one (grad_slots.py)."""

    @staticmethod
    def forward(ctx, u, weight, bias, conv_state, seq_idx, u_slot):
        ctx.save_for_backward(u, weight, bias, conv_state, seq_idx)
        ctx.u_slot = u_slot
        return _forward(u, weight, bias, conv_state, seq_idx)

    @staticmethod
    def backward(ctx, grad_out):
        u, weight, bias, conv_state, seq_idx = ctx.saved_tensors
        grad_u, grad_w, grad_b = _backward(grad_out, u, weight, bias, conv_state, seq_idx, claim(ctx.u_slot, u.dtype))
        return grad_u, grad_w, grad_b, None, None, None


def causal_conv1d_silu(
    u: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    conv_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
    return_state: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``F.silu(causal_conv1d(u, weight, bias, conv_state, seq_idx)[0])`` and the new conv_state (None unless
    ``return_state``), fused in Triton.

    u (b, l, d) fp32/bf16/fp16 with unit channel stride (other strides free); weight (d, 1, k), 2 <= k; bias (d,)
    or None; conv_state (b, d, k-1) or None; seq_idx (b, l) integer or None. Returns out (b, l, d) contiguous in
    u's dtype and new_state (b, d, k-1) in u's dtype. Differentiable in u, weight and bias; a conv_state that
    requires grad is refused (ValueError) while grad is enabled: use the torch path then.
    """
    k = weight.size(-1)
    if k < 2:
        raise ValueError(f"causal_conv1d_silu needs a kernel width of at least 2, got {k}")
    if conv_state is not None and conv_state.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "causal_conv1d_silu gives no gradient to conv_state: use conv.causal_conv1d when it requires grad"
        )
    u_slot = slot_of(u)  # (a copy made below passes its gradient on unchanged)
    if u.stride(-1) != 1:
        u = u.contiguous()
    if conv_state is not None:
        conv_state = conv_state.to(u.dtype)  # earlier inputs: rounded as u is, as the torch path does
    out = _CausalConv1dSiLU.apply(u, weight, bias, conv_state, seq_idx, u_slot)
    return out, carried_inputs(u, conv_state, seq_idx, k) if return_state else None
