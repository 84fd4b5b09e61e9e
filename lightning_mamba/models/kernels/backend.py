"""The one kernel switch: pure torch everywhere, mamba_ssm's Triton SSD on CUDA when installed (and there short
rows in the SSD's attention form in our fused Triton kernels; the conv in causal_conv1d's CUDA kernels when that
library is installed too, except on short rows, else in our Triton kernel; the norms in our Triton kernels, or
mamba_ssm's inside ``norm_kernels("mamba_ssm")``). Each choice was timed on an H200 (docs/performance.md). On the
Triton path the kernels' backwards write the gradients of the mixer's split pieces into the split's one buffer
(grad_slots.py)."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import types

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import NO_DT_LIMIT, ConfigError
from ..conv import causal_conv1d, conv_step
from ..ssd import positive_dt, ssd_chunked, ssd_quadratic
from . import conv_cc1d, embedding_triton, ssd_blocked_triton, ssd_chunked_mamba, ssd_quadratic_triton
from .overrides import overridden

BACKENDS = ("auto", "torch", "triton")
NORM_KERNELS = ("mamba_ssm", "ours")  # the Triton path's norms: mamba_ssm's, or models/kernels/norm_triton.py
# per norm (residual add + RMSNorm, gated RMSNorm): the whole 130m and 370m steps ran 1.04x and 1.02x faster with
# both of ours than with both of mamba_ssm's, and the 130m step 1.01x faster than with ours for the add norm and
# mamba_ssm's gated one (docs/performance.md)
_norm_kernel = {"add": "ours", "gated": "ours"}
# causal_conv1d's kernels lose to ours on rows this short: to the tiles at LEN 16 (forward + backward 1.36-1.73x slower
# in every training case, d_state 2048; benchmarks/conv_kernel.py --shape cells, H200), to the walk through time
# (conv_triton.SCAN_LENS) at LEN 32 (the whole step 1.14x the steps/s at d_state 512; H100)
OURS_CONV_MAX_LEN = 32


def ours_conv_max_len(max_len: int):
    """Inside the block rows of at most ``max_len`` tokens take our Triton conv where causal_conv1d is installed
    (OURS_CONV_MAX_LEN), so a benchmark can time both in one process (benchmarks/cell_throughput.py's
    ``<contender>_tritonconv``)."""
    return overridden(sys.modules[__name__], "OURS_CONV_MAX_LEN", max_len)


@contextlib.contextmanager
def norm_kernels(name: str | None = None, *, add: str | None = None, gated: str | None = None):
    """Inside the block the Triton path's norms run ``name``'s kernels (both norms), or ``add``'s for the residual
    add + RMSNorm and ``gated``'s for the gated RMSNorm (an unnamed one keeps its kernels), so a benchmark can time
    the choices in one process (benchmarks/train_throughput.py's ``lightning_graph_mambanorms``,
    ``lightning_graph_mambagated``)."""
    global _norm_kernel
    choice = {"add": add or name, "gated": gated or name}
    for which in (v for v in choice.values() if v is not None):
        if which not in NORM_KERNELS:
            raise ConfigError(f"unknown norm kernels {which!r}: use one of {', '.join(NORM_KERNELS)}")
    before = _norm_kernel
    _norm_kernel = {k: v or before[k] for k, v in choice.items()}
    try:
        yield
    finally:
        _norm_kernel = before


def norm_output_kept(backend: str, out: Tensor, residual: Tensor, norm, recompute: bool):
    """The context the mixer runs in after add_rmsnorm gave (out, residual). With ``recompute`` (the model's
    recompute_norm_output) on the Triton path with our add norm: one where autograd keeps no copy of out (in_proj
    saves it for its weight gradient) and the backward makes it again from the fp32 residual the norm keeps anyway
    (recompute.py): ~1.1 GiB less at 130m for one norm pass a layer. Else a null context."""
    if not (recompute and torch.is_grad_enabled() and _our_add_norm(backend, out)):
        return contextlib.nullcontext()
    from .norm_triton import rmsnorm_out
    from .recompute import saved_as_recomputed

    weight, eps, dtype = norm.weight, norm.eps, out.dtype
    return saved_as_recomputed(out, lambda: rmsnorm_out(residual, weight, eps, dtype))


# Kernel choices a benchmark can switch for an A/B in one process, each "ours" by default: the Triton path's attention
# form (ours: ssd_quadratic_triton.py, ssd_blocked_triton.py past its rows; blocked: ssd_blocked_triton.py at every
# row length; torch: ssd.py's einsums) and a small vocabulary's embedding backward (ours: embedding_triton.py; torch:
# F.embedding's, which sorts the ids)
KERNEL_CHOICES = {"attention-form": ("ours", "torch", "blocked"), "embedding": ("ours", "torch")}
_kernel_choice = {kind: "ours" for kind in KERNEL_CHOICES}


@contextlib.contextmanager
def _chosen(kind: str, name: str):
    """Inside the block ``kind``'s kernels are ``name``'s."""
    if name not in KERNEL_CHOICES[kind]:
        raise ConfigError(f"unknown {kind} kernels {name!r}: use one of {', '.join(KERNEL_CHOICES[kind])}")
    before, _kernel_choice[kind] = _kernel_choice[kind], name
    try:
        yield
    finally:
        _kernel_choice[kind] = before


def quadratic_kernels(name: str):
    """Inside the block the Triton path's short rows in the attention form run ``name``'s code (``torch``: the
    einsums of ssd.ssd_quadratic; ``blocked``: the 64-token-block kernels at every row length), so a benchmark can
    time them in one process (benchmarks/cell_throughput.py's ``<contender>_quadratic_torch`` and
    ``<contender>_quadratic_blocked``)."""
    return _chosen("attention-form", name)


def embedding_kernels(name: str):
    """Inside the block a small vocabulary's embedding backward on the Triton path runs ``name``'s code (``torch``:
    F.embedding's), so a benchmark can time both in one process (benchmarks/cell_throughput.py's
    ``<contender>_torchembedding``)."""
    return _chosen("embedding", name)


@functools.cache
def _triton_scan():
    """Import ``mamba_chunk_scan_combined``; returns (function or None, reason it is missing)."""

    if not torch.cuda.is_available():
        return None, "CUDA is not available"
    try:
        import selective_scan_cuda  # noqa: F401
    except ImportError:
        # mamba-ssm 2.3.2 imports its Mamba-1 CUDA extension eagerly; Mamba-2 never calls it, and the
        # pure-Python build (MAMBA_SKIP_CUDA_BUILD) lacks it. An empty placeholder lets the import run.
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    # mamba_ssm's scan kernels autotune per shape in every process; Triton keeps the choices on disk when this is on
    # as their decorators run (at this import). With them and the compiled kernels on disk, a second process's first
    # 32K-token evaluation at d_state 512 (headdim 64) took 1.98 s against the first's 49.3 s; the choices alone
    # saved a sweep cell ~4-7 s (H100, docs/performance.md). TRITON_CACHE_AUTOTUNING=0 turns it off.
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as e:  # ImportError, or a broken install
        return None, f"mamba_ssm does not import ({type(e).__name__}: {e})"
    return mamba_chunk_scan_combined, ""


@functools.cache
def _triton_norms():
    """mamba_ssm's fused Triton norms (add + RMSNorm, gated RMSNorm), or None."""
    if _triton_scan()[0] is None:
        return None
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn

    return rms_norm_fn, rmsnorm_fn


def check_backend(name: str) -> None:
    """Fail early, with what to change, for an unknown or unavailable backend."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    if name == "triton":
        fn, why = _triton_scan()
        if fn is None:
            raise ConfigError(
                f"backend 'triton' needs CUDA and mamba-ssm ({why}): install the cuda extra as the README says, "
                "or use --model.backend torch"
            )


def uses_triton(name: str, x: Tensor) -> bool:
    if name == "torch" or not x.is_cuda:
        if name == "triton":
            raise ConfigError("backend 'triton' needs the model on a CUDA device: move it to a GPU or use backend torch")
        return False
    fn, _ = _triton_scan()
    if fn is None and name == "triton":
        check_backend(name)
    return fn is not None


def ssd(
    backend: str,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    initial_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
    D: Tensor | None = None,
    quadratic_max_len: int = 0,
    return_final_state: bool = True,
    dt_bias: Tensor | None = None,
    dt_limit: tuple[float, float] = NO_DT_LIMIT,
    save_chunk_states: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """SSD scan with the chosen backend. Arguments as :func:`ssd.ssd_chunked` (dt already positive); ``D`` (heads),
    if given, adds the skip ``D * x`` to y (in x's dtype), inside the kernel on the Triton path. With ``dt_bias``
    (heads), ``dt`` is the raw projection and the scan uses :func:`ssd.positive_dt` of it with ``dt_limit``: inside
    mamba_ssm's chunked kernels (its dt_softplus) and our one-tile attention form's (without a dt_limit), else
    computed first.

    An input of at most ``quadratic_max_len`` tokens from a zero state takes the SSD's attention form (no padding
    to a chunk, no per-chunk states): on the Triton path, when no final state is asked for (training), our fused
    kernels (ssd_quadratic_triton.py, rows up to its MAX_LEN; longer rows up to ssd_blocked_triton.MAX_LEN in
    64-token blocks), else :func:`ssd.ssd_quadratic` in torch; the final state is None unless
    ``return_final_state``. ``save_chunk_states``: mamba_ssm's chunked kernels keep the forward's per-chunk states
    for the backward instead of recomputing them (ssd_chunked_mamba.py): less time, more memory."""
    attention_form = bool(quadratic_max_len) and x.size(1) <= quadratic_max_len and initial_state is None
    chunked_in_kernels = not attention_form and uses_triton(backend, x)
    attention_kernels = (attention_form and not return_final_state and _kernel_choice["attention-form"] != "torch"
                         and uses_triton(backend, x))
    one_tile_kernels = attention_kernels and _kernel_choice["attention-form"] == "ours"
    # rows of one tile in our kernels, which take dt raw when no dt_limit is set (checked before it is made positive)
    one_tile = (one_tile_kernels and tuple(dt_limit) == NO_DT_LIMIT
                and ssd_quadratic_triton.supports(x, dt, B, C, raw_dt=dt_bias is not None))
    # the kernels that take the raw dt: mamba_ssm's chunked ones and our one-tile ones
    if dt_bias is not None and not (one_tile or (chunked_in_kernels and ssd_chunked_mamba.entries() is not None)):
        dt, dt_bias = positive_dt(dt, dt_bias, dt_limit), None
    if attention_form:
        if attention_kernels:
            if one_tile or (one_tile_kernels and ssd_quadratic_triton.supports(x, dt, B, C)):  # rows of one tile
                return ssd_quadratic_triton.ssd_quadratic_fused(x, dt, A, B, C, D=D, seq_idx=seq_idx,
                                                                dt_bias=dt_bias), None
            if ssd_blocked_triton.supports(x, dt, B, C):  # longer rows, in 64-token blocks
                return ssd_blocked_triton.ssd_blocked(x, dt, A, B, C, D=D, seq_idx=seq_idx), None
        y, final_state = ssd_quadratic(x, dt, A, B, C, seq_idx=seq_idx, return_final_state=return_final_state)
        return _add_skip(y, x, D), final_state
    if chunked_in_kernels:
        # the kernel ties a carried-in state to document 0: number each row's documents from 0
        seq = None if seq_idx is None else (seq_idx - seq_idx[:, :1]).to(torch.int32).contiguous()
        # The kernels take strided views as long as the last dimension is contiguous: no copies of x, B, C, raw dt.
        if ssd_chunked_mamba.entries() is not None:  # the backward writes into the split's gradient buffer
            y, final_state = ssd_chunked_mamba.chunk_scan(x, dt, A, B, C, chunk_size, D, initial_state, seq,
                                                          dt_bias=dt_bias, dt_limit=dt_limit,
                                                          save_states=save_chunk_states)
        else:
            fn, _ = _triton_scan()
            y, final_state = fn(x, dt.contiguous(), A, B, C, chunk_size, D=D, initial_states=initial_state, seq_idx=seq,
                                dt_softplus=False, return_final_states=True)
        return y, final_state if return_final_state else None
    y, final_state = ssd_chunked(x, dt, A, B, C, chunk_size, initial_state=initial_state, seq_idx=seq_idx)
    return _add_skip(y, x, D), final_state if return_final_state else None


def _add_skip(y: Tensor, x: Tensor, D: Tensor | None) -> Tensor:
    return y if D is None else y.to(x.dtype) + x * D.to(x.dtype)[:, None]


def conv1d_silu(
    backend: str, u: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor | None = None,
    seq_idx: Tensor | None = None, return_state: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """silu(depthwise causal conv(u)) and the new conv state (:func:`conv.causal_conv1d`; None unless
    ``return_state``: training builds none). On the Triton path: causal_conv1d's kernels when installed, u's layout
    suits them (conv_cc1d.py) and its rows are longer than OURS_CONV_MAX_LEN, else our fused Triton kernel
    (conv_triton.py); both read u in its (b, l, d) layout. A carried conv state that needs a gradient takes the torch
    path, the only one that gives it."""
    if uses_triton(backend, u) and not (conv_state is not None and conv_state.requires_grad and torch.is_grad_enabled()):
        if u.size(1) > OURS_CONV_MAX_LEN and conv_cc1d.available() and conv_cc1d.unsupported(u, weight) is None:
            return conv_cc1d.conv1d_silu(u, weight, bias, conv_state, seq_idx, return_state=return_state)
        from .conv_triton import causal_conv1d_silu

        return causal_conv1d_silu(u, weight, bias, conv_state, seq_idx, return_state)
    out, new_state = causal_conv1d(u, weight, bias, conv_state, seq_idx, return_state)
    return F.silu(out), new_state


def conv1d_silu_step(
    backend: str, x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One decode token (causal_conv1d_update's argument order): x (b, d) -> (silu(conv) (b, d), new conv state
    (b, d, k-1) in x's dtype); conv_state is left as it was. causal_conv1d_update on the Triton path when installed
    and grad is off (it has no backward), else the torch ops (:func:`conv.conv_step`)."""
    if uses_triton(backend, x) and not torch.is_grad_enabled() and conv_cc1d.available() and 2 <= weight.size(-1) <= 4:
        return conv_cc1d.conv1d_silu_step(x, conv_state, weight, bias)
    out, new_state = conv_step(x, conv_state, weight, bias)
    return F.silu(out), new_state


def conv_kernel_name(backend: str = "auto", device: str | torch.device = "cuda") -> str:
    """Which conv kernel the model runs on ``device`` (for benchmarks and logs): "causal_conv1d" (its
    ``causal_conv1d_update`` for the decode step too), "triton" or "torch". (Rows of at most OURS_CONV_MAX_LEN and
    a layout causal_conv1d refuses, see conv_cc1d.unsupported, still take our Triton kernel.)"""
    if backend == "torch" or torch.device(device).type != "cuda" or _triton_scan()[0] is None:
        return "torch"
    return "causal_conv1d" if conv_cc1d.available() else "triton"


def embedding(backend: str, ids: Tensor, weight: Tensor) -> Tensor:
    """weight[ids] (F.embedding). On the Triton path, while the weight takes a gradient, a vocabulary of at most
    embedding_triton.MAX_VOCAB rows (the study's byte-level models) has its backward in our kernel instead of torch's
    sort of the ids (embedding_triton.py)."""
    if (_kernel_choice["embedding"] == "ours" and torch.is_grad_enabled() and weight.requires_grad
            and uses_triton(backend, weight) and embedding_triton.supports(weight)):
        return embedding_triton.embedding(ids, weight)
    return F.embedding(ids, weight)


def _our_add_norm(backend: str, h: Tensor) -> bool:
    """Whether add_rmsnorm runs our Triton kernels (models/kernels/norm_triton.py) for h."""
    return uses_triton(backend, h) and _norm_kernel["add"] == "ours"


def add_rmsnorm(backend: str, h: Tensor, residual: Tensor | None, norm, residual_in_fp32: bool) -> tuple[Tensor, Tensor]:
    """residual = h + residual (kept in fp32 when asked); returns (norm(residual), residual)."""
    if _our_add_norm(backend, h):
        from .norm_triton import add_rmsnorm as ours

        return ours(h, residual, norm.weight, norm.eps, residual_in_fp32)
    if uses_triton(backend, h):
        rms_norm_fn, _ = _triton_norms()
        return rms_norm_fn(h, norm.weight, None, residual=residual, prenorm=True, residual_in_fp32=residual_in_fp32,
                           eps=norm.eps)
    residual = h if residual is None else h + residual
    if residual_in_fp32:
        residual = residual.to(torch.promote_types(residual.dtype, torch.float32))
    return norm(residual.to(norm.weight.dtype)), residual


def gated_rmsnorm(backend: str, y: Tensor, z: Tensor, norm) -> Tensor:
    """norm(y * silu(z)) per group (norm_before_gate=False)."""
    if uses_triton(backend, y):
        if _norm_kernel["gated"] == "ours":
            from .norm_triton import gated_rmsnorm as ours

            return ours(y, z, norm.weight, norm.eps, norm.group_size)
        _, rmsnorm_fn = _triton_norms()
        return rmsnorm_fn(y, norm.weight, None, z=z, eps=norm.eps, group_size=norm.group_size, norm_before_gate=False)
    return norm(y, z)
