"""Our Triton RMSNorms: residual add + RMSNorm (the blocks' pre-norm) and the gated RMSNorm of the mixer
(norm_before_gate=False), forward and backward, the semantics of models/norm.py.

Why our own: in a 130m step on the H200 the norms' backward was the largest single kernel (docs/performance.md:
16.2 ms a step). mamba_ssm's backward runs one program per SM, each walking its share of the rows one row at a
time, so few rows are in flight. Here every program takes a tile of rows at once (a 2-D block) and the
backward walks its tiles with many programs per SM, each keeping its own partial sums of grad weight (summed
after). ``benchmarks/norm_kernel.py`` times them against mamba_ssm's kernels in one process; the whole training
step was faster with these (docs/performance.md), so kernels/backend.py runs them by default.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from .grad_slots import claim, slot_of
from .layout import last_dim_contiguous

try:  # CI machines have no triton: the module must still import
    import triton
    import triton.language as tl
except ImportError:
    triton = None

class TilePlan(NamedTuple):
    """A norm's tile plan: elements per tile (rows x the row length padded to a power of two), backward programs per
    SM (each sums its own grad-weight partials), elements of a tile per thread (sets the warps), and whether a
    backward program's loads of its next tile are in flight while it works on the current one."""

    tile_elements: int
    programs_per_sm: int
    elements_per_thread: int
    prefetch: bool = False  # the backward loads its next tile before working on this one (timed: docs/performance.md)


# Per norm, from benchmarks/norm_kernel.py --sweep (each plan replayed from a CUDA graph) at the 130m shapes on an
# H200: the add norm's backward took 120.6 us at (2048, 16, 16) (163.6 at the earlier shared 4096 / 8 / 16), the
# gated norm's 209.4 us at (2048, 8, 8) (285.3 at 4096 / 8 / 16, 236.8 at the add norm's plan; docs/performance.md).
# The gated norm over narrow groups (the study's cells: 512 channels) takes its own plan: on an H100 its backward took
# 97.5 us at the 130m plan and 54.4 at (2048, 8, 16, prefetch) (norm_kernel.py --shape cell --sweep, 2026-12-05); the
# add norm's plan was already the fastest there (38.8 against 38.6 us).
PLANS = {"add": TilePlan(2048, 16, 16), "gated": TilePlan(2048, 8, 8), "gated_narrow": TilePlan(2048, 8, 16, True)}
NARROW_BLOCK = 512  # a gated norm whose groups pad to at most this many channels takes "gated_narrow"


def _block(width: int) -> int:
    """A row's tile width: ``width`` rounded up to a power of two."""
    return 1 << max(width - 1, 0).bit_length()


def plan_key(norm: str, width: int) -> str:
    """The key in PLANS of ``norm`` ("add" or "gated") over rows (groups) of ``width`` channels."""
    return "gated_narrow" if norm == "gated" and _block(width) <= NARROW_BLOCK else norm


def tile_plan(n_rows: int, width: int, device: torch.device, norm: str = "add") -> tuple[int, int, int, int]:
    """(block width, rows per tile, backward programs, tiles per backward program) for ``n_rows`` rows of
    ``width`` channels under the plan of ``norm`` at that width (plan_key)."""
    plan = PLANS[plan_key(norm, width)]
    block = _block(width)
    rows = max(1, min(16, plan.tile_elements // block))
    tiles = -(-n_rows // rows)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        cap = plan.programs_per_sm * _sm_count(index)
    else:
        cap = 64  # Triton's CPU interpreter (tests): any count is correct
    per_program = -(-tiles // max(1, min(tiles, cap)))
    return block, rows, -(-tiles // per_program), per_program


@functools.cache
def _sm_count(device_index: int) -> int:
    """SMs of a GPU, asked once (tile_plan runs at every norm call of an eager step)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _warps(block: int, rows: int, key: str = "add") -> int:
    """About the elements per thread of plan ``key`` (in PLANS) in a tile (the backward holds several fp32 tiles at
    once; more per thread would spill registers), 4 to 16 warps."""
    return max(4, min(16, block * rows // (32 * PLANS[key].elements_per_thread)))


if triton is not None:

    @triton.jit
    def _tile(first_row, n_rows, width, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """Rows first_row + (0..ROWS) x columns (0..BLOCK): rows, rows as an int64 column (for offsets), columns, and
        the masks of rows, columns and the tile."""
        rows = first_row + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        row_ok = rows < n_rows
        col_ok = cols < width
        return rows, rows.to(tl.int64)[:, None], cols, row_ok, col_ok, row_ok[:, None] & col_ok[None, :]

    @triton.jit
    def _rms_scale(x, w_ptr, cols, col_ok, width, eps):
        """Each row's rstd and x * rstd * w, of fp32 x: the add norm's arithmetic in one place, so that its forward
        and rmsnorm_out give the same bits."""
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / width + eps)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        return rstd, x * rstd[:, None] * w[None, :]

    @triton.jit
    def _add_rmsnorm_fwd_kernel(h_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, rstd_ptr, n_rows, width,
                                stride_h, stride_res, stride_out, stride_res_out, eps,
                                HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows, rows64, cols, row_ok, col_ok, mask = _tile(tl.program_id(0) * ROWS, n_rows, width, ROWS, BLOCK)
        x = tl.load(h_ptr + rows64 * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x += tl.load(res_ptr + rows64 * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = x.to(res_out_ptr.dtype.element_ty)  # the residual stream as stored: the norm reads what the backward will
        tl.store(res_out_ptr + rows64 * stride_res_out + cols[None, :], x, mask=mask)
        rstd, y = _rms_scale(x.to(tl.float32), w_ptr, cols, col_ok, width, eps)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)
        tl.store(out_ptr + rows64 * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rmsnorm_out_kernel(x_ptr, w_ptr, out_ptr, n_rows, width, stride_x, stride_out, eps,
                            ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """The add norm's output again from the residual it stored: its forward's arithmetic on the same tiles
        (the same bits)."""
        rows, rows64, cols, row_ok, col_ok, mask = _tile(tl.program_id(0) * ROWS, n_rows, width, ROWS, BLOCK)
        x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        _rstd, y = _rms_scale(x, w_ptr, cols, col_ok, width, eps)
        tl.store(out_ptr + rows64 * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_bwd_loads(x_ptr, rstd_ptr, dout_ptr, dres_out_ptr, first, n_rows, width, stride_x, stride_dout,
                       stride_dres_out, HAS_DRES_OUT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """A tile's inputs to the add norm's backward, as stored (dres_out: x's when there is none)."""
        rows, rows64, cols, row_ok, _col_ok, mask = _tile(first, n_rows, width, ROWS, BLOCK)
        x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        dy = tl.load(dout_ptr + rows64 * stride_dout + cols[None, :], mask=mask, other=0.0)
        dres_out = x
        if HAS_DRES_OUT:
            dres_out = tl.load(dres_out_ptr + rows64 * stride_dres_out + cols[None, :], mask=mask, other=0.0)
        return x, rstd, dy, dres_out

    @triton.jit
    def _add_rmsnorm_bwd_kernel(x_ptr, w_ptr, rstd_ptr, dout_ptr, dres_out_ptr, dh_ptr, dres_ptr, dw_ptr, n_rows, width,
                                stride_x, stride_dout, stride_dres_out, stride_dh, stride_dres,
                                TILES_PER_PROGRAM: tl.constexpr, HAS_DRES_OUT: tl.constexpr,
                                STORE_DRES: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                                PREFETCH: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        col_ok = cols < width
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        first_tile = pid * TILES_PER_PROGRAM * ROWS
        if PREFETCH:
            nxt = _add_bwd_loads(x_ptr, rstd_ptr, dout_ptr, dres_out_ptr, first_tile, n_rows, width, stride_x,
                                 stride_dout, stride_dres_out, HAS_DRES_OUT, ROWS, BLOCK)
        for i in range(TILES_PER_PROGRAM):  # a constexpr trip count: one compile per plan, fixed in training
            first = first_tile + i * ROWS
            rows, rows64, _cols, row_ok, _col_ok, mask = _tile(first, n_rows, width, ROWS, BLOCK)
            if PREFETCH:  # this tile came with the last step; the next one's loads go out now (after the last: none)
                x, rstd, dy, dres_out = nxt
                nxt = _add_bwd_loads(x_ptr, rstd_ptr, dout_ptr, dres_out_ptr, first + ROWS,
                                     tl.where(i + 1 < TILES_PER_PROGRAM, n_rows, 0), width, stride_x, stride_dout,
                                     stride_dres_out, HAS_DRES_OUT, ROWS, BLOCK)
            else:
                x, rstd, dy, dres_out = _add_bwd_loads(x_ptr, rstd_ptr, dout_ptr, dres_out_ptr, first, n_rows, width,
                                                       stride_x, stride_dout, stride_dres_out, HAS_DRES_OUT, ROWS,
                                                       BLOCK)
            x_hat = x.to(tl.float32) * rstd[:, None]
            dy = dy.to(tl.float32)
            w_dy = dy * w[None, :]
            c = tl.sum(x_hat * w_dy, axis=1) / width
            dx = (w_dy - x_hat * c[:, None]) * rstd[:, None]
            if HAS_DRES_OUT:  # the residual stream's own gradient passes through the add
                dx += dres_out.to(tl.float32)
            tl.store(dh_ptr + rows64 * stride_dh + cols[None, :], dx.to(dh_ptr.dtype.element_ty), mask=mask)
            if STORE_DRES:
                tl.store(dres_ptr + rows64 * stride_dres + cols[None, :], dx.to(dres_ptr.dtype.element_ty), mask=mask)
            dw += tl.sum(dy * x_hat, axis=0)
        tl.store(dw_ptr + pid * width + cols, dw, mask=col_ok)

    @triton.jit
    def _gated_rmsnorm_fwd_kernel(y_ptr, z_ptr, w_ptr, out_ptr, rstd_ptr, n_rows, group_size, n_groups,
                                  stride_y, stride_z, stride_out, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        group = tl.program_id(1)
        rows, rows64, cols, row_ok, col_ok, mask = _tile(tl.program_id(0) * ROWS, n_rows, group_size, ROWS, BLOCK)
        offset = group * group_size + cols[None, :]
        y = tl.load(y_ptr + rows64 * stride_y + offset, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows64 * stride_z + offset, mask=mask, other=0.0).to(tl.float32)
        g = y * z * tl.sigmoid(z)
        rstd = 1.0 / tl.sqrt(tl.sum(g * g, axis=1) / group_size + eps)
        tl.store(rstd_ptr + rows * n_groups + group, rstd, mask=row_ok)
        w = tl.load(w_ptr + group * group_size + cols, mask=col_ok, other=0.0).to(tl.float32)
        out = g * rstd[:, None] * w[None, :]
        tl.store(out_ptr + rows64 * stride_out + offset, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gated_bwd_loads(y_ptr, z_ptr, rstd_ptr, dout_ptr, first, n_rows, group_size, n_groups, group, stride_y,
                         stride_z, stride_dout, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """A tile's inputs to the gated norm's backward, as stored."""
        rows, rows64, cols, row_ok, _col_ok, mask = _tile(first, n_rows, group_size, ROWS, BLOCK)
        offset = group * group_size + cols[None, :]
        y = tl.load(y_ptr + rows64 * stride_y + offset, mask=mask, other=0.0)
        z = tl.load(z_ptr + rows64 * stride_z + offset, mask=mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows * n_groups + group, mask=row_ok, other=0.0)
        d = tl.load(dout_ptr + rows64 * stride_dout + offset, mask=mask, other=0.0)
        return y, z, rstd, d

    @triton.jit
    def _gated_rmsnorm_bwd_kernel(y_ptr, z_ptr, w_ptr, rstd_ptr, dout_ptr, dy_ptr, dz_ptr, dw_ptr, n_rows, group_size,
                                  n_groups, stride_y, stride_z, stride_dout, stride_dy, stride_dz,
                                  TILES_PER_PROGRAM: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                                  PREFETCH: tl.constexpr):
        pid = tl.program_id(0)
        group = tl.program_id(1)
        cols = tl.arange(0, BLOCK)
        col_ok = cols < group_size
        w = tl.load(w_ptr + group * group_size + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        first_tile = pid * TILES_PER_PROGRAM * ROWS
        if PREFETCH:
            nxt = _gated_bwd_loads(y_ptr, z_ptr, rstd_ptr, dout_ptr, first_tile, n_rows, group_size, n_groups, group,
                                   stride_y, stride_z, stride_dout, ROWS, BLOCK)
        for i in range(TILES_PER_PROGRAM):  # a constexpr trip count: one compile per plan, fixed in training
            first = first_tile + i * ROWS
            rows, rows64, _cols, row_ok, _col_ok, mask = _tile(first, n_rows, group_size, ROWS, BLOCK)
            offset = group * group_size + cols[None, :]
            if PREFETCH:  # this tile came with the last step; the next one's loads go out now (after the last: none)
                y, z, rstd, d = nxt
                nxt = _gated_bwd_loads(y_ptr, z_ptr, rstd_ptr, dout_ptr, first + ROWS,
                                       tl.where(i + 1 < TILES_PER_PROGRAM, n_rows, 0), group_size, n_groups, group,
                                       stride_y, stride_z, stride_dout, ROWS, BLOCK)
            else:
                y, z, rstd, d = _gated_bwd_loads(y_ptr, z_ptr, rstd_ptr, dout_ptr, first, n_rows, group_size, n_groups,
                                                 group, stride_y, stride_z, stride_dout, ROWS, BLOCK)
            y = y.to(tl.float32)
            z = z.to(tl.float32)
            sig = tl.sigmoid(z)
            silu = z * sig
            g = y * silu
            g_hat = g * rstd[:, None]
            d = d.to(tl.float32)
            w_d = d * w[None, :]
            c = tl.sum(g_hat * w_d, axis=1) / group_size
            dg = (w_d - g_hat * c[:, None]) * rstd[:, None]
            tl.store(dy_ptr + rows64 * stride_dy + offset, (dg * silu).to(dy_ptr.dtype.element_ty), mask=mask)
            dz = dg * y * sig * (1.0 + z * (1.0 - sig))  # d silu(z) / dz
            tl.store(dz_ptr + rows64 * stride_dz + offset, dz.to(dz_ptr.dtype.element_ty), mask=mask)
            dw += tl.sum(d * g_hat, axis=0)
        tl.store(dw_ptr + pid * n_groups * group_size + group * group_size + cols, dw, mask=col_ok)


def _rows(t: Tensor) -> Tensor:
    """(rows, width) view with unit stride along the width (a copy only when the last dim is strided)."""
    return last_dim_contiguous(t.reshape(-1, t.shape[-1]))


class AddRMSNorm(torch.autograd.Function):
    """(rmsnorm(h + residual) * weight in h's dtype, h + residual in the residual's dtype: fp32 with
    residual_in_fp32, else the residual's, or h's on the first block)."""

    @staticmethod
    def forward(ctx, h: Tensor, residual: Tensor | None, weight: Tensor, eps: float, residual_in_fp32: bool):
        shape = h.shape
        h2 = _rows(h)
        res2 = None if residual is None else _rows(residual)
        res_dtype = torch.float32 if residual_in_fp32 else (h.dtype if residual is None else residual.dtype)
        n_rows, width = h2.shape
        out = torch.empty_like(h2)
        res_out = torch.empty(n_rows, width, dtype=res_dtype, device=h.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=h.device)
        block, rows, _, _ = tile_plan(n_rows, width, h.device)
        _add_rmsnorm_fwd_kernel[(triton.cdiv(n_rows, rows),)](
            h2, res2 if res2 is not None else h2, weight, out, res_out, rstd, n_rows, width,
            h2.stride(0), res2.stride(0) if res2 is not None else 0, out.stride(0), res_out.stride(0), eps,
            HAS_RESIDUAL=res2 is not None, ROWS=rows, BLOCK=block, num_warps=_warps(block, rows))
        ctx.save_for_backward(res_out, weight, rstd)
        ctx.has_residual = residual is not None
        ctx.dtypes = (h.dtype, None if residual is None else residual.dtype)
        return out.view(shape), res_out.view(shape)

    @staticmethod
    def backward(ctx, dout: Tensor, dres_out: Tensor | None):
        x, weight, rstd = ctx.saved_tensors
        shape = dout.shape
        dout2 = _rows(dout)
        dres_out2 = None if dres_out is None else _rows(dres_out)
        n_rows, width = x.shape
        h_dtype, res_dtype = ctx.dtypes
        dh = torch.empty(n_rows, width, dtype=h_dtype, device=x.device)
        store_dres = ctx.has_residual and res_dtype != h_dtype
        dres = torch.empty(n_rows, width, dtype=res_dtype, device=x.device) if store_dres else None
        block, rows, programs, per_program = tile_plan(n_rows, width, x.device)
        dw = torch.empty(programs, width, dtype=torch.float32, device=x.device)
        _add_rmsnorm_bwd_kernel[(programs,)](
            x, weight, rstd, dout2, dres_out2 if dres_out2 is not None else dout2, dh, dres if store_dres else dh, dw,
            n_rows, width, x.stride(0), dout2.stride(0), dres_out2.stride(0) if dres_out2 is not None else 0,
            dh.stride(0), dres.stride(0) if store_dres else 0,
            TILES_PER_PROGRAM=per_program, HAS_DRES_OUT=dres_out2 is not None, STORE_DRES=store_dres, ROWS=rows,
            BLOCK=block, PREFETCH=PLANS["add"].prefetch, num_warps=_warps(block, rows))
        d_residual = None if not ctx.has_residual else (dres if store_dres else dh).view(shape)
        return dh.view(shape), d_residual, dw.sum(0).to(weight.dtype), None, None


def add_rmsnorm(h: Tensor, residual: Tensor | None, weight: Tensor, eps: float,
                residual_in_fp32: bool) -> tuple[Tensor, Tensor]:
    """(norm(h + residual), h + residual) as kernels/backend.add_rmsnorm returns them."""
    return AddRMSNorm.apply(h, residual, weight, eps, residual_in_fp32)


def rmsnorm_out(res_out: Tensor, weight: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """add_rmsnorm's first output (norm(h + residual) in h's ``dtype``) from its second, the residual it returned:
    the same kernel tiles and arithmetic, so the same bits (for recompute.saved_as_recomputed). No autograd."""
    x = _rows(res_out)
    n_rows, width = x.shape
    out = torch.empty(n_rows, width, dtype=dtype, device=x.device)
    block, rows, _, _ = tile_plan(n_rows, width, x.device)
    _rmsnorm_out_kernel[(triton.cdiv(n_rows, rows),)](
        x, weight, out, n_rows, width, x.stride(0), out.stride(0), eps, ROWS=rows, BLOCK=block,
        num_warps=_warps(block, rows))
    return out.view(res_out.shape)


class GatedRMSNorm(torch.autograd.Function):
    """rmsnorm(y * silu(z)) * weight per group of ``group_size`` channels, in y's dtype."""

    @staticmethod
    def forward(ctx, y: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int, z_slot=None):
        shape = y.shape
        y2, z2 = _rows(y), _rows(z)
        n_rows, width = y2.shape
        n_groups = width // group_size
        out = torch.empty_like(y2)
        rstd = torch.empty(n_rows, n_groups, dtype=torch.float32, device=y.device)
        block, rows, _, _ = tile_plan(n_rows, group_size, y.device, "gated")
        key = plan_key("gated", group_size)
        _gated_rmsnorm_fwd_kernel[(triton.cdiv(n_rows, rows), n_groups)](
            y2, z2, weight, out, rstd, n_rows, group_size, n_groups, y2.stride(0), z2.stride(0), out.stride(0), eps,
            ROWS=rows, BLOCK=block, num_warps=_warps(block, rows, key))
        ctx.save_for_backward(y2, z2, weight, rstd)
        ctx.group_size, ctx.z_slot = group_size, z_slot
        ctx.dtypes = (y.dtype, z.dtype)
        return out.view(shape)

    @staticmethod
    def backward(ctx, dout: Tensor):
        y, z, weight, rstd = ctx.saved_tensors
        shape = dout.shape
        dout2 = _rows(dout)
        n_rows, width = y.shape
        group_size = ctx.group_size
        n_groups = width // group_size
        dy = torch.empty(n_rows, width, dtype=ctx.dtypes[0], device=y.device)
        dz = claim(ctx.z_slot, ctx.dtypes[1])  # z's columns of the in_proj split's gradient buffer, when it has one
        dz = torch.empty(n_rows, width, dtype=ctx.dtypes[1], device=y.device) if dz is None else dz.view(n_rows, width)
        block, rows, programs, per_program = tile_plan(n_rows, group_size, y.device, "gated")
        key = plan_key("gated", group_size)
        dw = torch.empty(programs, width, dtype=torch.float32, device=y.device)
        _gated_rmsnorm_bwd_kernel[(programs, n_groups)](
            y, z, weight, rstd, dout2, dy, dz, dw, n_rows, group_size, n_groups, y.stride(0), z.stride(0),
            dout2.stride(0), dy.stride(0), dz.stride(0), TILES_PER_PROGRAM=per_program, ROWS=rows, BLOCK=block,
            PREFETCH=PLANS[key].prefetch, num_warps=_warps(block, rows, key))
        return dy.view(shape), dz.view(shape), dw.sum(0).to(weight.dtype), None, None, None


def gated_rmsnorm(y: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int) -> Tensor:
    """norm(y * silu(z)) per group, as kernels/backend.gated_rmsnorm returns it."""
    if y.shape[-1] % group_size:
        raise ValueError(f"the width {y.shape[-1]} is not a multiple of group_size {group_size}")
    return GatedRMSNorm.apply(y, z, weight, eps, group_size, slot_of(z))
