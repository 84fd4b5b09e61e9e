"""The SSD's attention form for short rows from a zero state, forward and backward fused in Triton.

``ssd_quadratic_fused`` computes what :func:`lightning_mamba.models.ssd.ssd_quadratic` computes (plus the D skip):

    y_t = sum_{s <= t, same document} (C_t . B_s) exp(cs_t - cs_s) dt_s x_s + D x_t,   cs = cumsum(dt * A)

Why: the study trains 4 x 256 models on rows of 16-64 tokens, where ``quadratic_max_len`` takes this form. In torch
it is a chain of einsums, masks, exps and copies of (rows x heads x l x l) tensors: on an H200 those copies were
more than half the GPU time of a d_state 512, LEN 32 training step (benchmarks/profile_step.py --config cell).
Here one program per (batch row, group) computes C B^T once (l x l, over d_state), then walks the group's heads
with everything in registers; the backward recomputes the same (C B^T read back where the forward kept it:
KEEP_SCORES_FROM_N) and writes grad x, dt, B, C, and per-row partial sums of grad A and D (summed after:
deterministic, no atomics). (Splitting a group's heads over several programs, each making C B^T again, was timed
on an H100 and ran 0.83-0.99x the one-program speed: not kept. So was grad B, C in a kernel of its own, more
programs at once from grad C B^T written out: fewer spilled registers, but 0.93-0.98x fwd+bwd at d_state 128-2048.)
Products of fp32 inputs run in fp32, so results agree with the torch form to rounding; under bf16 autocast they
run on TF32 tensor cores (the torch form feeds its matmuls bf16).
No final state: training asks for none (the torch form builds it when asked). Rows up to MAX_LEN tokens: the
program holds several l x l tiles, and longer rows would spill registers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .grad_slots import claim, slot_of
from .layout import last_dim_contiguous

try:  # CI machines have no triton: the module must still import
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_LEN = 64  # rows longer than this take the torch form (the kernels' l x l tiles would spill registers)
BLOCK_N = 64  # d_state columns per step of the C B^T and grad B, C products
# Warps per program by tile length (NUM_WARPS, when set, for every tile) and software-pipelining stages (None:
# Triton's default); benchmarks/attention_form_kernel.py --sweep times others. On an H100: 2 warps for tiles of 32
# made fwd+bwd 1.41-1.54x faster than 4 (cells 256/32, 512/32; 1 warp 0.93x at 128/32); for 64-token tiles 4 warps
# beat 2 (1.45x, 1024/64) and 8 (1.2-1.7x, 64/64, 128/64); for tiles of 16, 1 warp beat 2 (1.13x, 2048/16; the whole
# step 192.8 against 187.2 steps/s).
WARPS_BY_TILE = {16: 1, 32: 2, 64: 4}
NUM_WARPS: int | None = None
NUM_STAGES: int | None = None
# A cap on registers per thread (None: the compiler's choice; the backward takes all 255 at 4 warps, so two programs
# share an SM): a lower cap lets more programs run at once, at the cost of spilling to local memory.
MAXNREG: int | None = None
# d_state from which the forward writes C B^T (one l x l fp32 tile per row and group) for the backward, which then
# reads it rather than making it again over d_state, by tile length (None: never). On an H100 (fwd+bwd, kept against
# made again): tiles of 32 0.98x at d_state 128, 1.00x at 256, 1.05x at 512, 1.11x at 1024; of 16 1.17x at 2048 (the
# whole step 199.5 against 192.4 steps/s); of 64 0.90x at 256 and 0.99x at 1024 (read from memory, C B^T makes the
# compiler compute the l x l decay in two layouts there, docs/performance.md). Tiles of 16 below 2048 are unmeasured.
KEEP_SCORES_FROM_N = {16: 512, 32: 512, 64: None}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(x: Tensor, dt: Tensor, B: Tensor, C: Tensor, max_len: int | None = None, raw_dt: bool = False) -> bool:
    """Whether the fused kernels take these inputs: CUDA (or Triton's interpreter, for tests), rows of at most
    ``max_len`` (default MAX_LEN), x, B, C in fp32/bf16/fp16 and dt an fp32 tensor, or with ``raw_dt`` (the
    projection before dt_bias and the softplus) any of those (fp64 exactness runs stay on the torch form)."""
    return (
        triton is not None
        and x.numel() > 0
        and x.size(1) <= (MAX_LEN if max_len is None else max_len)
        and x.dtype in _DTYPES and B.dtype in _DTYPES and C.dtype in _DTYPES
        and (dt.dtype in _DTYPES if raw_dt else dt.dtype == torch.float32)
    )


if triton is not None:

    @triton.jit
    def _c_bt(B_ptr, C_ptr, row_b, row_c, t, t_ok, sbl, scl, N: tl.constexpr, BLOCK_L: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT: tl.constexpr):
        """C B^T of one row and group: (BLOCK_L, BLOCK_L) fp32, zero at times >= l."""
        cb = tl.zeros((BLOCK_L, BLOCK_L), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            m = t_ok[:, None] & (n < N)[None, :]
            c = tl.load(C_ptr + row_c + t[:, None] * scl + n[None, :], mask=m, other=0.0).to(tl.float32)
            b = tl.load(B_ptr + row_b + t[:, None] * sbl + n[None, :], mask=m, other=0.0).to(tl.float32)
            cb += tl.dot(c, tl.trans(b), input_precision=DOT)
        return cb

    @triton.jit
    def _causal_same_doc(seq_ptr, row_s, t, t_ok, ssl, HAS_SEQ: tl.constexpr):
        """(i, j) pairs that contribute: j <= i < l, and the same document when seq_idx is given."""
        keep = (t[None, :] <= t[:, None]) & t_ok[:, None] & t_ok[None, :]
        if HAS_SEQ:
            doc = tl.load(seq_ptr + row_s + t * ssl, mask=t_ok, other=0)
            keep = keep & (doc[:, None] == doc[None, :])
        return keep

    @triton.jit
    def _load_tile(base, offs, mask, EVEN: tl.constexpr):
        """A (time, headdim) tile at base + offs; masked unless EVEN (the rows fill the tile: no mask to hold)."""
        if EVEN:
            tile = tl.load(base + offs)
        else:
            tile = tl.load(base + offs, mask=mask, other=0.0)
        return tile

    @triton.jit
    def _store_tile(base, offs, value, mask, EVEN: tl.constexpr):
        """_load_tile's store."""
        if EVEN:
            tl.store(base + offs, value)
        else:
            tl.store(base + offs, value, mask=mask)

    @triton.jit
    def _head_decay(dt_ptr, bias_ptr, A_ptr, row_dt, hd, t, t_ok, sdl, keep, HAS_BIAS: tl.constexpr):
        """dt (BLOCK_L,), A of head hd and its decay exp(cs_i - cs_j) on the kept pairs, zero elsewhere; and the
        softplus's argument v (with HAS_BIAS dt = softplus(v), v = raw dt + dt_bias, threshold 20 as mamba_ssm's)."""
        v = tl.load(dt_ptr + row_dt + t * sdl + hd, mask=t_ok, other=0.0).to(tl.float32)
        dt = v
        if HAS_BIAS:
            v += tl.load(bias_ptr + hd).to(tl.float32)
            dt = tl.where(t_ok, tl.where(v <= 20.0, tl.log(tl.exp(v) + 1.0), v), 0.0)
        a = tl.load(A_ptr + hd).to(tl.float32)
        cs = tl.cumsum(dt * a, axis=0)
        decay = tl.exp(tl.where(keep, cs[:, None] - cs[None, :], float("-inf")))
        return dt, a, decay, v

    @triton.jit
    def _row_group(B_ptr, C_ptr, seq_ptr, cb_ptr, l, sbb, sbl, sbg, scb, scl, scg, ssb, ssl, P: tl.constexpr,
                   N: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_N: tl.constexpr, DOT: tl.constexpr, CB: tl.constexpr):
        """This program's batch row and group, its times and headdim columns with their masks, the offsets of its B
        and C rows, C B^T and the pairs that contribute. CB: 0 make C B^T, 1 make it and write it to cb_ptr (b,
        groups, BLOCK_L, BLOCK_L), 2 read it from there."""
        bi = tl.program_id(0).to(tl.int64)
        gi = tl.program_id(1)
        t = tl.arange(0, BLOCK_L)
        t_ok = t < l
        p = tl.arange(0, BLOCK_P)
        tp_ok = t_ok[:, None] & (p < P)[None, :]
        row_b, row_c = bi * sbb + gi * sbg, bi * scb + gi * scg
        cb_tile = cb_ptr + (bi * tl.num_programs(1) + gi) * (BLOCK_L * BLOCK_L) + t[:, None] * BLOCK_L + t[None, :]
        if CB == 2:
            cb = tl.load(cb_tile)
        else:
            cb = _c_bt(B_ptr, C_ptr, row_b, row_c, t, t_ok, sbl, scl, N, BLOCK_L, BLOCK_N, DOT)
            if CB == 1:
                tl.store(cb_tile, cb)
        keep = _causal_same_doc(seq_ptr, bi * ssb, t, t_ok, ssl, HAS_SEQ)
        return bi, gi, t, t_ok, p, tp_ok, row_b, row_c, cb, keep

    @triton.jit
    def _ssd_attention_fwd_kernel(
        x_ptr, dt_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, seq_ptr, cb_ptr, y_ptr, l,
        sxb, sxl, sxh, sdb, sdl, sbb, sbl, sbg, scb, scl, scg, ssb, ssl, syb, syl, syh,
        R: tl.constexpr, P: tl.constexpr, N: tl.constexpr, HAS_D: tl.constexpr,
        HAS_SEQ: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,
        BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, CB: tl.constexpr,
    ):
        # (no name is bound both before the loop and in it with another type: Triton's compiler refuses that for a
        # loop-carried variable, which the interpreter does not check; `_` was, and failed to compile on the GPU)
        bi, gi, t, t_ok, p, tp_ok, _row_b, _row_c, cb, keep = _row_group(
            B_ptr, C_ptr, seq_ptr, cb_ptr, l, sbb, sbl, sbg, scb, scl, scg, ssb, ssl, P, N, HAS_SEQ, BLOCK_L, BLOCK_P,
            BLOCK_N, DOT, CB,
        )
        x_tp = t[:, None] * sxl + p[None, :]
        y_tp = t[:, None] * syl + p[None, :]
        for r in range(R):  # the group's R heads share C B^T
            hd = gi * R + r
            dt, a, decay, _v = _head_decay(dt_ptr, bias_ptr, A_ptr, bi * sdb, hd, t, t_ok, sdl, keep, HAS_BIAS)
            x = _load_tile(x_ptr + (bi * sxb + hd * sxh), x_tp, tp_ok, EVEN).to(tl.float32)
            y = tl.dot(cb * decay * dt[None, :], x, input_precision=DOT)
            if HAS_D:
                y += tl.load(D_ptr + hd).to(tl.float32) * x
            _store_tile(y_ptr + (bi * syb + hd * syh), y_tp, y.to(y_ptr.dtype.element_ty), tp_ok, EVEN)

    @triton.jit
    def _ssd_attention_bwd_kernel(
        x_ptr, dt_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, seq_ptr, cb_ptr, dy_ptr, dx_ptr, ddt_ptr, dB_ptr, dC_ptr,
        dA_part_ptr, dD_part_ptr, dbias_part_ptr, l, H,
        sxb, sxl, sxh, sdb, sdl, sbb, sbl, sbg, scb, scl, scg, ssb, ssl, syb, syl, syh,
        sob, sol, soh, sgb, sgl, sgg, sgdb, sgdl,
        R: tl.constexpr, P: tl.constexpr, N: tl.constexpr, HAS_D: tl.constexpr,
        HAS_SEQ: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,
        BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, CB: tl.constexpr,
    ):
        """grad x (strides so*), dt (dt's layout), per-row grad A and D (b, H); grad B and C (both strides sg*)."""
        bi, gi, t, t_ok, p, tp_ok, row_b, row_c, cb, keep = _row_group(
            B_ptr, C_ptr, seq_ptr, cb_ptr, l, sbb, sbl, sbg, scb, scl, scg, ssb, ssl, P, N, HAS_SEQ, BLOCK_L, BLOCK_P,
            BLOCK_N, DOT, CB,
        )
        # in-row offsets of the (time, headdim) tiles in int32, a row's base added as a scalar: half the registers of
        # int64 offsets (with the unmasked tiles, ptxas's spill stores at a 32-token tile, 4 warps: 156 -> 96 B)
        x_tp = t[:, None] * sxl + p[None, :]
        dy_tp = t[:, None] * syl + p[None, :]
        dx_tp = t[:, None] * sol + p[None, :]
        dcb = tl.zeros((BLOCK_L, BLOCK_L), dtype=tl.float32)
        for r in range(R):
            hd = gi * R + r
            dt, a, decay, v = _head_decay(dt_ptr, bias_ptr, A_ptr, bi * sdb, hd, t, t_ok, sdl, keep, HAS_BIAS)
            x = _load_tile(x_ptr + (bi * sxb + hd * sxh), x_tp, tp_ok, EVEN).to(tl.float32)
            dy = _load_tile(dy_ptr + (bi * syb + hd * syh), dy_tp, tp_ok, EVEN).to(tl.float32)
            w = decay * dt[None, :]  # y = (cb * w) @ x
            dx = tl.dot(tl.trans(cb * w), dy, input_precision=DOT)
            if HAS_D:
                dx += tl.load(D_ptr + hd).to(tl.float32) * dy
                tl.store(dD_part_ptr + bi * H + hd, tl.sum(tl.sum(dy * x, axis=1), axis=0))
            _store_tile(dx_ptr + (bi * sob + hd * soh), dx_tp, dx.to(dx_ptr.dtype.element_ty), tp_ok, EVEN)
            ds = tl.dot(dy, tl.trans(x), input_precision=DOT)  # grad of the scores cb * w
            dcb += ds * w
            q = ds * cb * decay  # grad of w over dt_j
            m = q * dt[None, :]  # grad of cs_i - cs_j
            dcs = tl.sum(m, axis=1) - tl.sum(m, axis=0)
            # grad of log alpha_k = sum_{i >= k} dcs_i; alpha_0 cancels from every difference (exactly 0)
            dda = tl.sum(dcs, axis=0) - tl.cumsum(dcs, axis=0) + dcs
            dda = tl.where(t == 0, 0.0, dda)
            ddt = tl.sum(q, axis=0) + dda * a
            if HAS_BIAS:  # through the softplus: the raw dt's gradient, and dt_bias's partial sum per row
                ddt = tl.where(v <= 20.0, ddt * tl.sigmoid(v), ddt)
                ddt = tl.where(t_ok, ddt, 0.0)
                tl.store(dbias_part_ptr + bi * H + hd, tl.sum(ddt, axis=0))
            tl.store(ddt_ptr + bi * sgdb + t * sgdl + hd, ddt.to(ddt_ptr.dtype.element_ty), mask=t_ok)
            tl.store(dA_part_ptr + bi * H + hd, tl.sum(dda * dt, axis=0))
        for n0 in range(0, N, BLOCK_N):
            _grad_b_c(dcb, B_ptr, C_ptr, dB_ptr, dC_ptr, row_b, row_c, bi * sgb + gi * sgg, t, t_ok, n0, sbl, scl,
                      sgl, N, BLOCK_N, DOT)

    @triton.jit
    def _grad_b_c(dcb, B_ptr, C_ptr, dB_ptr, dC_ptr, row_b, row_c, row_g, t, t_ok, n0, sbl, scl, sgl,
                  N: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr):
        """grad C = dcb B and grad B = dcb^T C at d_state columns n0 + (0..BLOCK_N) of one row and group."""
        n = n0 + tl.arange(0, BLOCK_N)
        m = t_ok[:, None] & (n < N)[None, :]
        b = tl.load(B_ptr + row_b + t[:, None] * sbl + n[None, :], mask=m, other=0.0).to(tl.float32)
        c = tl.load(C_ptr + row_c + t[:, None] * scl + n[None, :], mask=m, other=0.0).to(tl.float32)
        dc = tl.dot(dcb, b, input_precision=DOT)
        db = tl.dot(tl.trans(dcb), c, input_precision=DOT)
        g_off = row_g + t[:, None] * sgl + n[None, :]
        tl.store(dC_ptr + g_off, dc.to(dC_ptr.dtype.element_ty), mask=m)
        tl.store(dB_ptr + g_off, db.to(dB_ptr.dtype.element_ty), mask=m)


def _launch_args(x: Tensor, dt: Tensor, B: Tensor, C: Tensor, seq_idx: Tensor | None) -> tuple[tuple, dict, tuple]:
    """The inputs' strides (both kernels take them first; y, dy, dx and grad B, C pass their own after), the
    constexprs and the grid: one program per (batch row, group)."""
    b, l, h, p = x.shape
    g, n = B.size(2), B.size(3)
    tile = block_l(l)
    seq = (0, 0) if seq_idx is None else seq_idx.stride()
    strides = (x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1),
               B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2), *seq)
    meta = dict(R=h // g, P=p, N=n, HAS_SEQ=seq_idx is not None, BLOCK_L=tile, EVEN=l == tile and p == block_p(p),
                DOT=dot_precision(x, B, C), BLOCK_P=block_p(p), BLOCK_N=block_n(n),
                num_warps=num_warps(tile), **launch_options())
    return strides, meta, (b, g)


def launch_options() -> dict:
    """num_stages and maxnreg for a launch where NUM_STAGES and MAXNREG are set (else Triton's defaults)."""
    return {**({} if NUM_STAGES is None else {"num_stages": NUM_STAGES}),
            **({} if MAXNREG is None else {"maxnreg": MAXNREG})}


def dot_precision(x: Tensor, B: Tensor, C: Tensor) -> str:
    """fp32 inputs (tests, fp32 training): exact fp32 products; half inputs (bf16 autocast): TF32 tensor cores, which
    hold bf16 values exactly and round the fp32 scores to 10 mantissa bits (the torch form's matmuls take bf16)."""
    return "ieee" if x.dtype == B.dtype == C.dtype == torch.float32 else "tf32"


def block_l(l: int) -> int:
    """times of a tile: the row's length padded to a power of two, at least 16 (tl.dot's least)."""
    return max(16, triton.next_power_of_2(l))


def num_warps(tile: int) -> int:
    """Warps per program for tiles of ``tile`` times: NUM_WARPS when set, else WARPS_BY_TILE's."""
    return NUM_WARPS if NUM_WARPS is not None else WARPS_BY_TILE[tile]


def keep_scores(tile: int, n: int) -> bool:
    """Whether the backward reads the forward's C B^T at tiles of ``tile`` times and d_state ``n``
    (KEEP_SCORES_FROM_N)."""
    least = KEEP_SCORES_FROM_N.get(tile)
    return least is not None and n >= least


def block_p(p: int) -> int:
    """headdim columns of a tile: p padded to a power of two, at least 16 (tl.dot's least)."""
    return max(16, triton.next_power_of_2(p))


def block_n(n: int) -> int:
    """d_state columns per step of the C B^T and grad B, C products."""
    return min(BLOCK_N, max(16, triton.next_power_of_2(n)))


class _SSDQuadratic(torch.autograd.Function):
    """y = attention-form SSD + D x; saves the inputs (and C B^T where keep_scores says) and recomputes everything else
    in backward. With dt_bias, dt is the raw projection (the kernels apply dt_bias and the softplus)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, seq_idx, dt_bias, slots, grads):
        y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        strides, meta, grid = _launch_args(x, dt, B, C, seq_idx)
        tile = meta["BLOCK_L"]
        # C B^T for the backward: only where one will run (grads: autograd records this call)
        cb = (torch.empty(*grid, tile, tile, device=x.device, dtype=torch.float32)
              if grads and keep_scores(tile, B.size(3)) else None)
        _ssd_attention_fwd_kernel[grid](
            x, dt, dt if dt_bias is None else dt_bias, A, B, C, x if D is None else D,
            x if seq_idx is None else seq_idx, y if cb is None else cb, y, x.size(1), *strides, *y.stride()[:3],
            HAS_D=D is not None, HAS_BIAS=dt_bias is not None, CB=0 if cb is None else 1, **meta,
        )
        ctx.save_for_backward(x, dt, A, B, C, D, seq_idx, dt_bias, cb)
        ctx.slots = slots
        return y

    @staticmethod
    def backward(ctx, dy):
        x, dt, A, B, C, D, seq_idx, dt_bias, cb = ctx.saved_tensors
        b, h = x.size(0), x.size(2)
        dy = last_dim_contiguous(dy)
        # into x's, dt's, B's and C's columns of the splits' gradient buffers when they are their pieces (grad_slots.py)
        dx, ddt, dB, dC = (claim(slot, t.dtype) for slot, t in zip(ctx.slots, (x, dt, B, C)))
        dx = torch.empty(x.shape, device=x.device, dtype=x.dtype) if dx is None else dx
        ddt = torch.empty(dt.shape, device=dt.device, dtype=dt.dtype) if ddt is None else ddt
        if dB is None or dC is None or dB.stride() != dC.stride():  # the kernel gives both one set of strides
            dB = torch.empty(B.shape, device=B.device, dtype=B.dtype)
            dC = torch.empty(C.shape, device=C.device, dtype=C.dtype)
        # the per-row partial sums of grad A, D and dt_bias in one buffer, summed by one kernel
        parts = torch.empty(1 + (D is not None) + (dt_bias is not None), b, h, device=x.device, dtype=torch.float32)
        dA_part = parts[0]
        dD_part = parts[1] if D is not None else dA_part
        dbias_part = parts[-1] if dt_bias is not None else dA_part
        strides, meta, grid = _launch_args(x, dt, B, C, seq_idx)
        _ssd_attention_bwd_kernel[grid](
            x, dt, dt if dt_bias is None else dt_bias, A, B, C, x if D is None else D,
            x if seq_idx is None else seq_idx, x if cb is None else cb, dy, dx, ddt, dB, dC, dA_part, dD_part,
            dbias_part, x.size(1), h, *strides, *dy.stride()[:3], *dx.stride()[:3], *dB.stride()[:3], ddt.stride(0),
            ddt.stride(1), HAS_D=D is not None, HAS_BIAS=dt_bias is not None, CB=0 if cb is None else 2, **meta,
        )
        sums = parts.sum(1)
        dA = sums[0].to(A.dtype)
        dD = None if D is None else sums[1].to(D.dtype)
        dbias = None if dt_bias is None else sums[-1].to(dt_bias.dtype)
        return dx, ddt, dA, dB, dC, dD, None, dbias, None, None


def ssd_quadratic_fused(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None, seq_idx: Tensor | None = None,
    dt_bias: Tensor | None = None,
) -> Tensor:
    """y of :func:`ssd.ssd_quadratic` (no final state) plus ``D * x``, in x's dtype, by the fused kernels.

    x (b, l, h, p) and B, C (b, l, g, n) with any strides but a contiguous last dimension (column slices of the
    conv's output need no copy); dt (b, l, h) fp32, positive, or with ``dt_bias`` (h,) the raw projection (any
    strides but a contiguous last dimension; the kernels use softplus(dt + dt_bias), as ssd.positive_dt without a
    dt_limit); A, D (h,); seq_idx (b, l) or None. l <= MAX_LEN (``supports`` says whether the kernels take the
    inputs). Differentiable in x, dt, A, B, C, D and dt_bias; pieces of a grad_slots split get their gradients
    written in place."""
    slots = tuple(slot_of(t) for t in (x, dt, B, C))  # (a copy made below passes its gradient on unchanged)
    x, B, C = (last_dim_contiguous(t) for t in (x, B, C))
    dt = last_dim_contiguous(dt) if dt_bias is not None else dt.contiguous()
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, dt, A, B, C, D, dt_bias))
    return _SSDQuadratic.apply(x, dt, A.contiguous(), B, C, None if D is None else D.contiguous(), seq_idx,
                               None if dt_bias is None else dt_bias.contiguous(), slots, grads)
