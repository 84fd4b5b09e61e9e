"""The depthwise causal conv1d + SiLU walking time in registers: forward and backward for short rows.

conv_triton.py's kernels work on (time x channel) tiles: each tap reads the tile again, shifted in time, so every
input is loaded K times (2K - 1 in the backward), from L1 at best. Here a program takes ROWS batch rows x BLOCK_D
channels and walks T consecutive times one at a time, keeping the last K inputs (and, in the backward, the next
K - 1 SiLU gradients) in registers: each input, output and gradient crosses memory once, in rows of BLOCK_D
contiguous channels. Time is the sequential axis, so a program holds a row's T times; rows longer than T are cut
into chunks whose edges re-read K - 1 inputs (forward) or recompute K - 1 gradients (backward).

The same sums as conv_triton.py: taps padded to KW = 4 (zeros first), so one kernel serves kernel widths 2-4
(Mamba's d_conv is 4); inputs of an earlier document contribute 0 (negative times belong to the document at time
0: the carried state's); grad weight and bias as fp32 partial sums, one per program, summed after (deterministic).
Which rows take these kernels is conv_triton.py's choice (``SCAN_LENS``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .conv_common import grad_u_buffer, kernel_args, partial_sums, weight_bias_grads
from .layout import last_dim_contiguous, stride_unit

try:  # CI machines have no triton: the module must still import
    import triton
    import triton.language as tl
except ImportError:
    triton = None

KW = 4  # the window: kernels of width 2..KW, taps padded with zeros at the front
TIME_CHUNK = 64  # times a program walks at most (a row of l <= TIME_CHUNK is one chunk of l)
# (BLOCK_D, ROWS, warps, unroll): channels and batch rows of a program, and how many of its time steps the compiler
# unrolls (a walk unrolled whole, 67 steps, took ~70 s to compile the backward). Two rows and two warps: fwd+bwd
# 185 us against (128, 4, 4, 4)'s 206 at d_state 512 LEN 32, 121 against 161 at 256 / 64, the forward alone even
# (benchmarks/conv_kernel.py --shape mixed --timer graph --scan, H100)
FWD_PLAN = (128, 2, 2, 4)
BWD_PLAN = (128, 2, 2, 4)


def takes(k: int) -> bool:
    """Whether these kernels take a conv of kernel width k."""
    return 2 <= k <= KW


def time_chunk(l: int) -> int:
    """Times per program for rows of length l."""
    return max(1, min(l, TIME_CHUNK))


if triton is not None:

    @triton.jit
    def _x_at(u_base, st_base, t, l, d, ok, su_l, K: tl.constexpr, HAS_STATE: tl.constexpr, NEG: tl.constexpr):
        """fp32 inputs at time t (a runtime scalar) of every (row, channel) of the program: u for 0 <= t < l, the
        carried state for 1 - K <= t < 0 (only read where NEG says t may be negative), else 0."""
        x = tl.load(u_base + t.to(tl.int64) * su_l, mask=ok & (t >= 0) & (t < l), other=0.0).to(tl.float32)
        if HAS_STATE and NEG:
            x += tl.load(st_base + (t + K - 1) * d, mask=ok & (t < 0) & (t >= 1 - K), other=0.0).to(tl.float32)
        return x

    @triton.jit
    def _doc_at(seq_base, t, l, row_ok, sq_l):
        """Each row's document id at time t (negative t: the id at 0; -1 past the end)."""
        return tl.load(seq_base + tl.maximum(t, 0).to(tl.int64) * sq_l, mask=row_ok & (t < l), other=-1)

    @triton.jit
    def _same(keep, x, HAS_SEQ: tl.constexpr):
        """x where its row's `keep` holds (same document), else 0; x itself without documents."""
        if HAS_SEQ:
            x = tl.where(keep[:, None], x, 0.0)
        return x

    @triton.jit
    def _program(b, d, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
        """This program's rows (int64) and channels, and which (row, channel) pairs exist."""
        chans = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        rows = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < b
        ok = row_ok[:, None] & (chans < d)[None, :]
        return rows.to(tl.int64), chans, row_ok, ok

    @triton.jit
    def _taps(w_ptr, bias_ptr, chans, d, HAS_BIAS: tl.constexpr):
        """The padded taps (KW, d) fp32 as four (1, BLOCK_D) rows, w3 multiplying the current input, and the bias."""
        chan_ok = chans < d
        w0 = tl.load(w_ptr + chans, mask=chan_ok, other=0.0)[None, :]
        w1 = tl.load(w_ptr + d + chans, mask=chan_ok, other=0.0)[None, :]
        w2 = tl.load(w_ptr + 2 * d + chans, mask=chan_ok, other=0.0)[None, :]
        w3 = tl.load(w_ptr + 3 * d + chans, mask=chan_ok, other=0.0)[None, :]
        bias = tl.zeros_like(w0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
        return w0, w1, w2, w3, bias

    @triton.jit
    def _scan_fwd_kernel(
        u_ptr, w_ptr, bias_ptr, state_ptr, seq_ptr, out_ptr, b, l, d,
        su_b, su_l, ss_b, sq_b, sq_l,
        K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_SEQ: tl.constexpr, U_UNIT: tl.constexpr,
        T: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, UNROLL: tl.constexpr,
    ):
        """silu(conv) at T times from chunk start t0 of ROWS rows x BLOCK_D channels; out contiguous (b, l, d)."""
        su_b, su_l = su_b * U_UNIT, su_l * U_UNIT  # see layout.stride_unit
        rows, chans, row_ok, ok = _program(b, d, BLOCK_D, ROWS)
        u_base = u_ptr + rows[:, None] * su_b + chans[None, :]
        st_base = state_ptr + rows[:, None] * ss_b + chans[None, :]
        seq_base = seq_ptr + rows * sq_b
        out_base = out_ptr + rows[:, None] * l * d + chans[None, :]
        w0, w1, w2, w3, bias = _taps(w_ptr, bias_ptr, chans, d, HAS_BIAS)
        t0 = tl.program_id(0) * T
        # the inputs 1, 2 and 3 steps before the chunk (x1, x2, x3) and their documents
        x1 = _x_at(u_base, st_base, t0 - 1, l, d, ok, su_l, K, HAS_STATE, True)
        x2 = _x_at(u_base, st_base, t0 - 2, l, d, ok, su_l, K, HAS_STATE, True)
        x3 = _x_at(u_base, st_base, t0 - 3, l, d, ok, su_l, K, HAS_STATE, True)
        # (no documents: never read). Each loop-carried value starts as its own tensor: Triton's compiler carries a
        # name through a loop only if its value changes, so of names that start as one tensor and pass it along
        # inside the loop (d3 = d2), only the first would be carried (the interpreter runs it right either way)
        d1 = tl.zeros((ROWS,), dtype=tl.int32)
        d2 = tl.zeros((ROWS,), dtype=tl.int32)
        d3 = tl.zeros((ROWS,), dtype=tl.int32)
        if HAS_SEQ:
            d1 = _doc_at(seq_base, t0 - 1, l, row_ok, sq_l).to(tl.int32)
            d2 = _doc_at(seq_base, t0 - 2, l, row_ok, sq_l).to(tl.int32)
            d3 = _doc_at(seq_base, t0 - 3, l, row_ok, sq_l).to(tl.int32)
        for i in tl.range(0, T, loop_unroll_factor=UNROLL):
            t = t0 + i
            x0 = _x_at(u_base, st_base, t, l, d, ok, su_l, K, HAS_STATE, False)
            d0 = d1
            if HAS_SEQ:
                d0 = _doc_at(seq_base, t, l, row_ok, sq_l).to(tl.int32)
            pre = bias + w3 * x0 + w2 * _same(d1 == d0, x1, HAS_SEQ) + w1 * _same(d2 == d0, x2, HAS_SEQ) \
                + w0 * _same(d3 == d0, x3, HAS_SEQ)
            out = pre * tl.sigmoid(pre)
            tl.store(out_base + t * d, out.to(out_ptr.dtype.element_ty), mask=ok & (t < l))
            x3 = x2
            x2 = x1
            x1 = x0
            d3 = d2
            d2 = d1
            d1 = d0

    @triton.jit
    def _scan_bwd_kernel(
        u_ptr, w_ptr, bias_ptr, state_ptr, seq_ptr, dy_ptr, du_ptr, part_ptr, b, l, d,
        su_b, su_l, ss_b, sq_b, sq_l, sy_b, sy_l, sdu_b, sdu_l,
        K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_SEQ: tl.constexpr, U_UNIT: tl.constexpr,
        DU_UNIT: tl.constexpr, KW_: tl.constexpr, T: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
        UNROLL: tl.constexpr,
    ):
        """grad u at T times from chunk start t0 of ROWS rows x BLOCK_D channels, and the program's partial sums of
        grad weight (KW taps) and bias.

        Walks time backwards from t0 + T + 2: g(t) = dy(t) silu'(pre(t)), pre recomputed from the last inputs;
        grad u(t) = sum_lag w[KW-1-lag] g(t + lag) (same document); grad w[KW-1-lag] += g(t) x(t - lag) (same
        document); grad bias += g(t). The first three steps (past the chunk) only make the g that grad u needs.
        """
        su_b, su_l = su_b * U_UNIT, su_l * U_UNIT  # see layout.stride_unit
        sdu_b, sdu_l = sdu_b * DU_UNIT, sdu_l * DU_UNIT
        rows, chans, row_ok, ok = _program(b, d, BLOCK_D, ROWS)
        u_base = u_ptr + rows[:, None] * su_b + chans[None, :]
        st_base = state_ptr + rows[:, None] * ss_b + chans[None, :]
        seq_base = seq_ptr + rows * sq_b
        dy_base = dy_ptr + rows[:, None] * sy_b + chans[None, :]
        du_base = du_ptr + rows[:, None] * sdu_b + chans[None, :]
        w0, w1, w2, w3, bias = _taps(w_ptr, bias_ptr, chans, d, HAS_BIAS)
        t0 = tl.program_id(0) * T
        top = t0 + T + 2  # the first time walked
        # inputs at the first time and the two before it (xa0, xa1, xa2; xa3 is loaded by each step)
        xa0 = _x_at(u_base, st_base, top, l, d, ok, su_l, K, HAS_STATE, False)
        xa1 = _x_at(u_base, st_base, top - 1, l, d, ok, su_l, K, HAS_STATE, False)
        xa2 = _x_at(u_base, st_base, top - 2, l, d, ok, su_l, K, HAS_STATE, False)
        # g one, two and three steps later (g1, g2, g3); past the walk's start they are never used (times >= l or
        # in the three extra steps)
        # each its own tensor, as the forward's d1..d3 (why there)
        g1 = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
        g2 = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
        g3 = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
        da0 = tl.zeros((ROWS,), dtype=tl.int32)  # documents at the walk's times (da) and later (db)
        da1 = tl.zeros((ROWS,), dtype=tl.int32)
        da2 = tl.zeros((ROWS,), dtype=tl.int32)
        db1 = tl.zeros((ROWS,), dtype=tl.int32)
        db2 = tl.zeros((ROWS,), dtype=tl.int32)
        db3 = tl.zeros((ROWS,), dtype=tl.int32)
        if HAS_SEQ:
            da0 = _doc_at(seq_base, top, l, row_ok, sq_l).to(tl.int32)
            da1 = _doc_at(seq_base, top - 1, l, row_ok, sq_l).to(tl.int32)
            da2 = _doc_at(seq_base, top - 2, l, row_ok, sq_l).to(tl.int32)
        dw0 = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)  # the sums over the program's rows and times
        dw1 = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
        dw2 = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
        dw3 = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
        dbias = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
        for j in tl.range(0, T + 3, loop_unroll_factor=UNROLL):
            t = top - j
            # only at the walk's last three steps can t - 3 be negative (when t0 is 0): the state's
            xa3 = _x_at(u_base, st_base, t - 3, l, d, ok, su_l, K, HAS_STATE, True)
            da3 = da2
            if HAS_SEQ:
                da3 = _doc_at(seq_base, t - 3, l, row_ok, sq_l).to(tl.int32)
            xm1 = _same(da1 == da0, xa1, HAS_SEQ)
            xm2 = _same(da2 == da0, xa2, HAS_SEQ)
            xm3 = _same(da3 == da0, xa3, HAS_SEQ)
            pre = bias + w3 * xa0 + w2 * xm1 + w1 * xm2 + w0 * xm3
            dy = tl.load(dy_base + t.to(tl.int64) * sy_l, mask=ok & (t < l), other=0.0).to(tl.float32)
            sig = tl.sigmoid(pre)
            g = dy * sig * (1.0 + pre * (1.0 - sig))  # zero past the end (dy is)
            # the first three steps (times past the chunk) only make the g that grad u needs
            in_chunk = j >= 3
            du = w3 * g + w2 * _same(db1 == da0, g1, HAS_SEQ) + w1 * _same(db2 == da0, g2, HAS_SEQ) \
                + w0 * _same(db3 == da0, g3, HAS_SEQ)
            tl.store(du_base + t.to(tl.int64) * sdu_l, du.to(du_ptr.dtype.element_ty), mask=ok & (t < l) & in_chunk)
            gc = tl.where(in_chunk, g, 0.0)
            dw3 += gc * xa0
            dw2 += gc * xm1
            dw1 += gc * xm2
            dw0 += gc * xm3
            dbias += gc
            g3 = g2
            g2 = g1
            g1 = g
            db3 = db2
            db2 = db1
            db1 = da0
            xa0 = xa1
            xa1 = xa2
            xa2 = xa3
            da0 = da1
            da1 = da2
            da2 = da3
        # this program's partial sums, in slot (chunk, row block) of the parts (., KW + 1, d): KW tap rows, then bias
        part = tl.program_id(0).to(tl.int64) * tl.num_programs(2) + tl.program_id(2)
        chan_ok = chans < d
        dw_row = part_ptr + part * (KW_ + 1) * d + chans  # KW_: KW (a kernel sees no plain globals)
        tl.store(dw_row + KW_ * d, tl.sum(dbias, axis=0), mask=chan_ok)
        tl.store(dw_row, tl.sum(dw0, axis=0), mask=chan_ok)
        tl.store(dw_row + d, tl.sum(dw1, axis=0), mask=chan_ok)
        tl.store(dw_row + 2 * d, tl.sum(dw2, axis=0), mask=chan_ok)
        tl.store(dw_row + 3 * d, tl.sum(dw3, axis=0), mask=chan_ok)


def forward(u: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor | None,
            seq_idx: Tensor | None) -> Tensor:
    """silu(conv) (b, l, d) contiguous in u's dtype; u (b, l, d) with unit channel stride."""
    b, l, d = u.shape
    out = torch.empty(b, l, d, device=u.device, dtype=u.dtype)
    if out.numel() == 0:
        return out
    ptrs, strides, flags = kernel_args(u, weight, bias, conv_state, seq_idx, KW)  # taps padded to KW
    block_d, rows, warps, unroll = FWD_PLAN
    chunk = time_chunk(l)
    grid = (triton.cdiv(l, chunk), triton.cdiv(d, block_d), triton.cdiv(b, rows))
    _scan_fwd_kernel[grid](*ptrs, out, b, l, d, *strides, **flags, T=chunk, BLOCK_D=block_d, ROWS=rows,
                           UNROLL=unroll, num_warps=warps)
    return out


def backward(grad_out: Tensor, u: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor | None,
             seq_idx: Tensor | None, grad_u: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(grad u, grad weight, grad bias); ``grad_u``: where to write grad u (unit channel stride), or None (new)."""
    b, l, d = u.shape
    grad_out = last_dim_contiguous(grad_out)
    block_d, rows, warps, unroll = BWD_PLAN
    chunk = time_chunk(l)
    grid = (triton.cdiv(l, chunk), triton.cdiv(d, block_d), triton.cdiv(b, rows))
    grad_u = grad_u_buffer(grad_u, u)
    parts = partial_sums(grid[0] * grid[2], KW, d, u.device)
    if grad_u.numel() > 0:
        ptrs, strides, flags = kernel_args(u, weight, bias, conv_state, seq_idx, KW)
        du_unit = stride_unit(grad_u)
        more = (grad_out.stride(0), grad_out.stride(1), grad_u.stride(0) // du_unit, grad_u.stride(1) // du_unit)
        _scan_bwd_kernel[grid](*ptrs, grad_out, grad_u, parts, b, l, d, *strides, *more, DU_UNIT=du_unit,
                               KW_=KW, **flags, T=chunk, BLOCK_D=block_d, ROWS=rows, UNROLL=unroll,
                               num_warps=warps)
    return grad_u, *weight_bias_grads(parts, weight, bias)
