"""The SSD's attention form for rows of 65 to MAX_LEN tokens from a zero state, in 64-token blocks, in Triton.

Same math as :func:`lightning_mamba.models.ssd.ssd_quadratic` (plus the D skip), for rows too long for
ssd_quadratic_triton.py's one-tile kernels:

    y_t = sum_{s <= t, same document} S_ts exp(cs_t - cs_s) dt_s x_s + D x_t,   S = C B^T,  cs = cumsum(dt * A)

Why: the forgetting study trains 4 x 256 models at d_state up to 2048 on rows of up to 256 tokens (the throughput
issue's cells reach 1024). Past 64 tokens those ran mamba_ssm's chunked kernels, which write and re-read a
(headdim x d_state) state per chunk and head: at d_state 512 and LEN 128 on an H200, 92 steps/s against ~220 for
32-token rows in the one-tile kernels. The attention form builds no state at all; its cost is the pairs of blocks.
A row of ``nb`` blocks has nb (nb + 1) / 2 pairs (i, j), j <= i. The kernels:

  * ``_ssd_blocked_scores_kernel`` (one program per row, group and pair): S_ij = C_i B_j^T over d_state, once for
    all the group's heads, kept (fp32, nb^2 x 64 x 64 per row and group: 256 KB at nb = 4, 4 MB at nb = 16) for
    the other kernels;
  * ``_ssd_blocked_fwd_kernel`` (per row, head and block i): y_i = sum_j (S_ij * decay * dt_j) x_j;
  * ``_ssd_blocked_bwd_x_kernel`` (per row, head and block j): grad x_j and the gradients of dt_j and of cs (from
    the decay);
  * ``_ssd_blocked_bwd_ds_kernel`` (per row, group and pair): the scores' gradient dS_ij, summed over the group's
    heads, kept in the scores' layout;
  * ``_ssd_blocked_bwd_bc_kernel`` (per row, group, block k and slice of d_state): grad C_k = sum_j dS_kj B_j and
    grad B_k = sum_i dS_ik^T C_i, in a fixed order (deterministic), written once, into the conv split's gradient
    buffer when B and C are its pieces (grad_slots.py), as grad x is.

cs = cumsum(dt * A) is computed in torch (autograd carries its gradient to dt and A). fp32 inputs multiply in fp32.
With half inputs, the products of two inputs (the scores C B^T over d_state, the heaviest at large states, and
dy x^T) run on the tensor cores in the inputs' dtype, exact in their fp32 accumulators; products with an fp32 factor
(the decayed scores, the scores' gradients) run on TF32, as in ssd_quadratic_triton.py, which holds the half
factor exactly and rounds the fp32 one to 10 mantissa bits. No final state (training asks for none).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..precision import HALF_DTYPES
from . import ssd_quadratic_triton
from .grad_slots import claim, slot_of
from .layout import last_dim_contiguous

try:  # CI machines have no triton: the module must still import
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK_T = 64  # tokens per block
# the throughput issue's longest cell rows; the pairs (and the kept scores) grow with the square of the blocks, so
# whether the form pays at a length and d_state is for benchmarks/cell_throughput.py to say (quadratic_max_len)
MAX_LEN = 1024
# Warps per program, every kernel here. 4: on an H100 the kernels alone ran 1.23x faster than at 8 (512/128 and
# 1024/256, benchmarks/attention_form_kernel.py --sweep), a whole graphed step 1.11-1.13x, though compiled for
# sm_90 they spill a few registers (none at 8).
NUM_WARPS = 4


def supports(x: Tensor, dt: Tensor, B: Tensor, C: Tensor) -> bool:
    """Whether these kernels take the inputs: as ssd_quadratic_triton.supports, up to this module's MAX_LEN."""
    return ssd_quadratic_triton.supports(x, dt, B, C, max_len=MAX_LEN)


if triton is not None:

    @triton.jit
    def _block(k, l, BLOCK_T: tl.constexpr):
        """Times of block k and which lie inside the row."""
        t = k * BLOCK_T + tl.arange(0, BLOCK_T)
        return t, t < l

    @triton.jit
    def _input_dot(a, b, DOT: tl.constexpr, HALF_DOT: tl.constexpr):
        """a @ b of two operands as loaded from the inputs (one dtype), fp32. HALF_DOT: half operands go to the
        tensor cores as they are, their products exact in the fp32 accumulator (TF32 holds them exactly too, at half
        the rate); else they are upcast and multiplied with DOT's precision (fp32 inputs; Triton's CPU interpreter,
        which cannot multiply half operands: Triton 3.6's multiplies their bit patterns)."""
        if HALF_DOT:
            return tl.dot(a, b)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT)

    @triton.jit
    def _keep(seq_ptr, row_s, ti, tj, ti_ok, tj_ok, ssl, HAS_SEQ: tl.constexpr):
        """Pairs (t in block i, s in block j) that contribute: s <= t, both in the row, the same document."""
        keep = (tj[None, :] <= ti[:, None]) & ti_ok[:, None] & tj_ok[None, :]
        if HAS_SEQ:
            doc_i = tl.load(seq_ptr + row_s + ti * ssl, mask=ti_ok, other=0)
            doc_j = tl.load(seq_ptr + row_s + tj * ssl, mask=tj_ok, other=-1)
            keep = keep & (doc_i[:, None] == doc_j[None, :])
        return keep

    @triton.jit
    def _decay(cs_ptr, dt_ptr, row_d, hd, ti, tj, ti_ok, tj_ok, sdl, keep):
        """dt of block j and exp(cs_t - cs_s) on the kept pairs (0 elsewhere) for head hd."""
        cs_i = tl.load(cs_ptr + row_d + ti * sdl + hd, mask=ti_ok, other=0.0)
        cs_j = tl.load(cs_ptr + row_d + tj * sdl + hd, mask=tj_ok, other=0.0)
        dt_j = tl.load(dt_ptr + row_d + tj * sdl + hd, mask=tj_ok, other=0.0)
        return dt_j, tl.exp(tl.where(keep, cs_i[:, None] - cs_j[None, :], float("-inf")))

    @triton.jit
    def _pair(l, NB: tl.constexpr, BLOCK_T: tl.constexpr):
        """A pair program's row, group and blocks (i, j) (grid axis 2 = i * NB + j; only j <= i has work) and the
        blocks' times."""
        i = tl.program_id(2) // NB
        j = tl.program_id(2) % NB
        ti, ti_ok = _block(i, l, BLOCK_T)
        tj, tj_ok = _block(j, l, BLOCK_T)
        return tl.program_id(0).to(tl.int64), tl.program_id(1), i, j, ti, ti_ok, tj, tj_ok

    @triton.jit
    def _decayed_scores(s_ptr, seq_ptr, cs_ptr, dt_ptr, bi, gi, hd, i, j, ti, tj, ti_ok, tj_ok, ssb, ssl, sdb, sdl,
                        G: tl.constexpr, NB: tl.constexpr, BLOCK_T: tl.constexpr, HAS_SEQ: tl.constexpr):
        """Pair (i, j) for head hd: dt of block j and the kept scores times the decay, S_ij * exp(cs_t - cs_s)."""
        keep = _keep(seq_ptr, bi * ssb, ti, tj, ti_ok, tj_ok, ssl, HAS_SEQ)
        dt_j, decay = _decay(cs_ptr, dt_ptr, bi * sdb, hd, ti, tj, ti_ok, tj_ok, sdl, keep)
        return dt_j, tl.load(_scores_ptrs(s_ptr, bi, gi, i, j, G, NB, BLOCK_T)) * decay

    @triton.jit
    def _head_program(l, R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
        """A head program's row, head, group and block k (grid axis 2) with its times, and the headdim columns."""
        hd = tl.program_id(1)
        k = tl.program_id(2)
        tk, tk_ok = _block(k, l, BLOCK_T)
        return tl.program_id(0).to(tl.int64), hd, hd // R, k, tk, tk_ok, tl.arange(0, BLOCK_P)

    @triton.jit
    def _scores_ptrs(s_ptr, bi, gi, i, j, G: tl.constexpr, NB: tl.constexpr, BLOCK_T: tl.constexpr):
        """Where S_ij of this row and group is kept: (b, G, NB, NB, BLOCK_T, BLOCK_T), contiguous."""
        r = tl.arange(0, BLOCK_T)
        base = (((bi * G + gi) * NB + i) * NB + j) * BLOCK_T * BLOCK_T
        return s_ptr + base + r[:, None] * BLOCK_T + r[None, :]

    @triton.jit
    def _ssd_blocked_scores_kernel(B_ptr, C_ptr, s_ptr, l, sbb, sbl, sbg, scb, scl, scg,
                       G: tl.constexpr, N: tl.constexpr, NB: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_N: tl.constexpr, DOT: tl.constexpr, HALF_DOT: tl.constexpr):
        bi, gi, i, j, ti, ti_ok, tj, tj_ok = _pair(l, NB, BLOCK_T)
        if j <= i:
            s = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
            for n0 in range(0, N, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                c = tl.load(C_ptr + bi * scb + gi * scg + ti[:, None] * scl + n[None, :],
                            mask=ti_ok[:, None] & (n < N)[None, :], other=0.0)
                b = tl.load(B_ptr + bi * sbb + gi * sbg + tj[:, None] * sbl + n[None, :],
                            mask=tj_ok[:, None] & (n < N)[None, :], other=0.0)
                s += _input_dot(c, tl.trans(b), DOT, HALF_DOT)
            tl.store(_scores_ptrs(s_ptr, bi, gi, i, j, G, NB, BLOCK_T), s)

    @triton.jit
    def _ssd_blocked_fwd_kernel(x_ptr, dt_ptr, cs_ptr, D_ptr, seq_ptr, s_ptr, y_ptr, l,
                    sxb, sxl, sxh, sdb, sdl, ssb, ssl, syb, syl, syh,
                    R: tl.constexpr, G: tl.constexpr, P: tl.constexpr, HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr,
                    NB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, DOT: tl.constexpr):
        bi, hd, gi, i, ti, ti_ok, p = _head_program(l, R, BLOCK_T, BLOCK_P)
        acc = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32)
        for j in range(NB):  # a constexpr trip count (Triton's interpreter needs static bounds under numpy >= 2.4)
            if j <= i:
                tj, tj_ok = _block(j, l, BLOCK_T)
                dt_j, sd = _decayed_scores(s_ptr, seq_ptr, cs_ptr, dt_ptr, bi, gi, hd, i, j, ti, tj, ti_ok, tj_ok,
                                           ssb, ssl, sdb, sdl, G, NB, BLOCK_T, HAS_SEQ)
                x_j = tl.load(x_ptr + bi * sxb + hd * sxh + tj[:, None] * sxl + p[None, :],
                              mask=tj_ok[:, None] & (p < P)[None, :], other=0.0).to(tl.float32)
                acc += tl.dot(sd * dt_j[None, :], x_j, input_precision=DOT)
        tp_ok = ti_ok[:, None] & (p < P)[None, :]
        if HAS_D:
            x_i = tl.load(x_ptr + bi * sxb + hd * sxh + ti[:, None] * sxl + p[None, :], mask=tp_ok, other=0.0)
            acc += tl.load(D_ptr + hd).to(tl.float32) * x_i.to(tl.float32)
        tl.store(y_ptr + bi * syb + hd * syh + ti[:, None] * syl + p[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=tp_ok)

    @triton.jit
    def _ssd_blocked_bwd_x_kernel(x_ptr, dt_ptr, cs_ptr, D_ptr, seq_ptr, s_ptr, dy_ptr, dx_ptr, ddt_ptr, dcs_col_ptr,
                      dcs_row_ptr, dD_part_ptr, l, H,
                      sxb, sxl, sxh, sdb, sdl, ssb, ssl, syb, syl, syh, sob, sol, soh,
                      R: tl.constexpr, G: tl.constexpr, P: tl.constexpr, HAS_D: tl.constexpr,
                      HAS_SEQ: tl.constexpr, NB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
                      DOT: tl.constexpr, HALF_DOT: tl.constexpr):
        """Key block j of head hd: grad x_j (into dx's strides), the direct gradient of dt_j (through dt_s x_s),
        and of cs: -(column sums) for block j into dcs_col, +(row sums) for each block i >= j into dcs_row[:, j]
        (b, NB, l, H: one writer per place, summed over j after); the D skip's part of grad D per (row, block)."""
        bi, hd, gi, j, tj, tj_ok, p = _head_program(l, R, BLOCK_T, BLOCK_P)
        tp_ok = tj_ok[:, None] & (p < P)[None, :]
        x_j = tl.load(x_ptr + bi * sxb + hd * sxh + tj[:, None] * sxl + p[None, :], mask=tp_ok, other=0.0)
        dx = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32)
        ddt = tl.zeros((BLOCK_T,), dtype=tl.float32)
        dcs_col = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for i in range(NB):
            if i >= j:
                ti, ti_ok = _block(i, l, BLOCK_T)
                dt_j, sd = _decayed_scores(s_ptr, seq_ptr, cs_ptr, dt_ptr, bi, gi, hd, i, j, ti, tj, ti_ok, tj_ok,
                                           ssb, ssl, sdb, sdl, G, NB, BLOCK_T, HAS_SEQ)
                dy_i = tl.load(dy_ptr + bi * syb + hd * syh + ti[:, None] * syl + p[None, :],
                               mask=ti_ok[:, None] & (p < P)[None, :], other=0.0)
                dx += tl.dot(tl.trans(sd * dt_j[None, :]), dy_i.to(tl.float32), input_precision=DOT)
                q = _input_dot(dy_i, tl.trans(x_j), DOT, HALF_DOT) * sd  # grad of the scores, times S * decay
                ddt += tl.sum(q, axis=0)
                m = q * dt_j[None, :]  # grad of cs_t - cs_s
                dcs_col += tl.sum(m, axis=0)
                tl.store(dcs_row_ptr + ((bi * NB + j) * l + ti) * H + hd, tl.sum(m, axis=1), mask=ti_ok)
        if HAS_D:
            dy_j = tl.load(dy_ptr + bi * syb + hd * syh + tj[:, None] * syl + p[None, :], mask=tp_ok, other=0.0)
            dy_j = dy_j.to(tl.float32)
            dx += tl.load(D_ptr + hd).to(tl.float32) * dy_j
            tl.store(dD_part_ptr + (bi * NB + j) * H + hd, tl.sum(tl.sum(dy_j * x_j.to(tl.float32), axis=1), axis=0))
        tl.store(dx_ptr + bi * sob + hd * soh + tj[:, None] * sol + p[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=tp_ok)
        tl.store(ddt_ptr + bi * sdb + tj * sdl + hd, ddt, mask=tj_ok)
        tl.store(dcs_col_ptr + bi * sdb + tj * sdl + hd, -dcs_col, mask=tj_ok)

    @triton.jit
    def _ssd_blocked_bwd_ds_kernel(x_ptr, dt_ptr, cs_ptr, seq_ptr, dy_ptr, ds_ptr, l,
                       sxb, sxl, sxh, sdb, sdl, ssb, ssl, syb, syl, syh,
                       R: tl.constexpr, G: tl.constexpr, P: tl.constexpr, HAS_SEQ: tl.constexpr,
                       NB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, DOT: tl.constexpr,
                       HALF_DOT: tl.constexpr):
        """Pair (i, j) of a row and group: the gradient of its scores, dS_ij = sum over the group's heads of
        (dy_i x_j^T) * decay * dt_j, kept in the scores' layout for _ssd_blocked_bwd_bc_kernel."""
        bi, gi, i, j, ti, ti_ok, tj, tj_ok = _pair(l, NB, BLOCK_T)
        if j <= i:
            p = tl.arange(0, BLOCK_P)
            keep = _keep(seq_ptr, bi * ssb, ti, tj, ti_ok, tj_ok, ssl, HAS_SEQ)
            ds = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
            for r in range(R):
                hd = gi * R + r
                dt_j, decay = _decay(cs_ptr, dt_ptr, bi * sdb, hd, ti, tj, ti_ok, tj_ok, sdl, keep)
                dy_i = tl.load(dy_ptr + bi * syb + hd * syh + ti[:, None] * syl + p[None, :],
                               mask=ti_ok[:, None] & (p < P)[None, :], other=0.0)
                x_j = tl.load(x_ptr + bi * sxb + hd * sxh + tj[:, None] * sxl + p[None, :],
                              mask=tj_ok[:, None] & (p < P)[None, :], other=0.0)
                ds += _input_dot(dy_i, tl.trans(x_j), DOT, HALF_DOT) * decay * dt_j[None, :]
            tl.store(_scores_ptrs(ds_ptr, bi, gi, i, j, G, NB, BLOCK_T), ds)

    @triton.jit
    def _ssd_blocked_bwd_bc_kernel(B_ptr, C_ptr, ds_ptr, dB_ptr, dC_ptr, l,
                       sbb, sbl, sbg, scb, scl, scg, sdbb, sdbl, sdbg, sdcb, sdcl, sdcg,
                       G: tl.constexpr, N: tl.constexpr, NB: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_N: tl.constexpr, DOT: tl.constexpr):
        """Block k of a row and group, d_state columns of block nk: grad C_k = sum_{j <= k} dS_kj B_j and
        grad B_k = sum_{i >= k} dS_ik^T C_i, summed here in a fixed order and written once (each with its own
        strides)."""
        bi = tl.program_id(0).to(tl.int64)
        gi = tl.program_id(1)
        k = tl.program_id(2) // tl.cdiv(N, BLOCK_N)
        n = (tl.program_id(2) % tl.cdiv(N, BLOCK_N)) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = (n < N)[None, :]
        tk, tk_ok = _block(k, l, BLOCK_T)
        dc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        db = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for m in range(NB):
            tm, tm_ok = _block(m, l, BLOCK_T)
            if m <= k:  # dS_km B_m
                b_m = tl.load(B_ptr + bi * sbb + gi * sbg + tm[:, None] * sbl + n[None, :],
                              mask=tm_ok[:, None] & n_ok, other=0.0).to(tl.float32)
                dc += tl.dot(tl.load(_scores_ptrs(ds_ptr, bi, gi, k, m, G, NB, BLOCK_T)), b_m, input_precision=DOT)
            if m >= k:  # dS_mk^T C_m
                c_m = tl.load(C_ptr + bi * scb + gi * scg + tm[:, None] * scl + n[None, :],
                              mask=tm_ok[:, None] & n_ok, other=0.0).to(tl.float32)
                ds_mk = tl.load(_scores_ptrs(ds_ptr, bi, gi, m, k, G, NB, BLOCK_T))
                db += tl.dot(tl.trans(ds_mk), c_m, input_precision=DOT)
        mask = tk_ok[:, None] & n_ok
        tl.store(dC_ptr + bi * sdcb + gi * sdcg + tk[:, None] * sdcl + n[None, :], dc.to(dC_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(dB_ptr + bi * sdbb + gi * sdbg + tk[:, None] * sdbl + n[None, :], db.to(dB_ptr.dtype.element_ty),
                 mask=mask)


def half_dots(x: Tensor, B: Tensor, C: Tensor) -> bool:
    """Whether the products of two inputs run on the tensor cores in the inputs' half dtype (_input_dot): x, B and C
    of one half dtype, on CUDA (CPU tensors mean Triton's interpreter, which cannot multiply half operands)."""
    return x.is_cuda and x.dtype == B.dtype == C.dtype and x.dtype in HALF_DTYPES


def _launch_meta(x: Tensor, B: Tensor, C: Tensor) -> dict:
    """The constexprs every kernel here takes (tile sizes and products as ssd_quadratic_triton's)."""
    l, p = x.size(1), x.size(3)
    return dict(P=p, NB=triton.cdiv(l, BLOCK_T), BLOCK_T=BLOCK_T, BLOCK_P=ssd_quadratic_triton.block_p(p),
                DOT=ssd_quadratic_triton.dot_precision(x, B, C), num_warps=NUM_WARPS)


class _SSDBlocked(torch.autograd.Function):
    """y = blocked attention-form SSD + D x, given cs = cumsum(dt * A); keeps the block scores for backward."""

    @staticmethod
    def forward(ctx, x, dt, cs, B, C, D, seq_idx, x_slot, bc_slots):
        b, l, h, _ = x.shape
        g, n = B.size(2), B.size(3)
        meta = _launch_meta(x, B, C)
        nb = meta["NB"]
        seq = x if seq_idx is None else seq_idx
        sseq = (0, 0) if seq_idx is None else seq_idx.stride()
        scores = torch.empty(b, g, nb, nb, BLOCK_T, BLOCK_T, device=x.device, dtype=torch.float32)
        _ssd_blocked_scores_kernel[(b, g, nb * nb)](
            B, C, scores, l, *B.stride()[:3], *C.stride()[:3], G=g, N=n, BLOCK_N=ssd_quadratic_triton.block_n(n),
            HALF_DOT=half_dots(x, B, C), **{k: meta[k] for k in ("NB", "BLOCK_T", "DOT", "num_warps")})
        y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        _ssd_blocked_fwd_kernel[(b, h, nb)](
            x, dt, cs, x if D is None else D, seq, scores, y, l, *x.stride()[:3], dt.stride(0), dt.stride(1), *sseq,
            *y.stride()[:3], R=h // g, G=g, HAS_D=D is not None, HAS_SEQ=seq_idx is not None, **meta)
        ctx.save_for_backward(x, dt, cs, B, C, D, seq_idx, scores)
        ctx.x_slot, ctx.bc_slots = x_slot, bc_slots
        return y

    @staticmethod
    def backward(ctx, dy):
        x, dt, cs, B, C, D, seq_idx, scores = ctx.saved_tensors
        b, l, h, _ = x.shape
        g, n = B.size(2), B.size(3)
        dy = ssd_quadratic_triton.last_dim_contiguous(dy.to(x.dtype))  # (y's dtype: _input_dot pairs it with x)
        meta = _launch_meta(x, B, C)
        nb = meta["NB"]
        seq = x if seq_idx is None else seq_idx
        sseq = (0, 0) if seq_idx is None else seq_idx.stride()
        dx = claim(ctx.x_slot, x.dtype)  # x's columns of the conv split's gradient buffer, when x is its piece
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype) if dx is None else dx
        ddt = torch.empty(dt.shape, device=x.device, dtype=torch.float32)
        dcs_col = torch.empty(dt.shape, device=x.device, dtype=torch.float32)
        dcs_row = torch.zeros(b, nb, l, h, device=x.device, dtype=torch.float32)  # block i < j: never written
        dD_part = torch.empty(b, nb, h, device=x.device, dtype=torch.float32)
        half = half_dots(x, B, C)  # both kernels below multiply dy by x
        _ssd_blocked_bwd_x_kernel[(b, h, nb)](
            x, dt, cs, x if D is None else D, seq, scores, dy, dx, ddt, dcs_col, dcs_row, dD_part, l, h,
            *x.stride()[:3], dt.stride(0), dt.stride(1), *sseq, *dy.stride()[:3], *dx.stride()[:3],
            R=h // g, G=g, HAS_D=D is not None, HAS_SEQ=seq_idx is not None, HALF_DOT=half, **meta)
        ds = torch.empty_like(scores)  # the scores' gradients, pair by pair
        _ssd_blocked_bwd_ds_kernel[(b, g, nb * nb)](
            x, dt, cs, seq, dy, ds, l, *x.stride()[:3], dt.stride(0), dt.stride(1), *sseq, *dy.stride()[:3],
            R=h // g, G=g, HAS_SEQ=seq_idx is not None, HALF_DOT=half, **meta)
        # into B's and C's columns of the conv split's gradient buffer when they are its pieces (grad_slots.py)
        dB, dC = (claim(slot, t.dtype) for slot, t in zip(ctx.bc_slots, (B, C)))
        dB = torch.empty(B.shape, device=x.device, dtype=B.dtype) if dB is None else dB
        dC = torch.empty(C.shape, device=x.device, dtype=C.dtype) if dC is None else dC
        block_n = ssd_quadratic_triton.block_n(n)
        _ssd_blocked_bwd_bc_kernel[(b, g, nb * triton.cdiv(n, block_n))](
            B, C, ds, dB, dC, l, *B.stride()[:3], *C.stride()[:3], *dB.stride()[:3], *dC.stride()[:3],
            G=g, N=n, BLOCK_N=block_n, **{k: meta[k] for k in ("NB", "BLOCK_T", "DOT", "num_warps")})
        dcs = dcs_row.sum(1) + dcs_col
        dD = None if D is None else dD_part.sum((0, 1)).to(D.dtype)
        return dx, ddt, dcs, dB, dC, dD, None, None, None


def ssd_blocked(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None, seq_idx: Tensor | None = None,
) -> Tensor:
    """y of :func:`ssd.ssd_quadratic` (no final state) plus ``D * x``, in x's dtype, by the blocked kernels.

    x (b, l, h, p) and B, C (b, l, g, n) with a contiguous last dimension (any other strides); dt (b, l, h) fp32,
    positive; A, D (h,); seq_idx (b, l) or None; l <= MAX_LEN (``supports``). Differentiable in x, dt, A, B, C, D."""
    x_slot, B_slot, C_slot = (slot_of(t) for t in (x, B, C))  # (a copy made below passes its gradient on unchanged)
    x, B, C = (last_dim_contiguous(t) for t in (x, B, C))
    dt = dt.contiguous()
    cs = torch.cumsum(dt * A.to(dt.dtype), dim=1)  # (b, l, h); its gradient reaches dt and A through autograd
    return _SSDBlocked.apply(x, dt, cs, B, C, None if D is None else D.contiguous(), seq_idx, x_slot,
                             (B_slot, C_slot))
