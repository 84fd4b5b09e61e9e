"""The causal-conv1d library's CUDA kernels (Dao-AILab's ``causal_conv1d``) on our conv's layout and semantics.

When the library imports, backend.conv1d_silu's Triton path runs ``causal_conv1d_fn`` instead of our Triton kernel
(conv_triton.py), and the decode step runs ``causal_conv1d_update``: on an H200 both were faster than ours at most
of the model's shapes (benchmarks/conv_kernel.py times the two side by side). What this module adapts:

- layout: u (b, l, d) with unit channel stride is the library's channel-last x = u.transpose(1, 2) (no copy, any
  row stride that is a multiple of 8); weight (d, 1, k) is viewed as (d, k); bias goes in weight's dtype.
- seq_idx: the library zeroes the output where an id is negative (its padding) and gives a carried-in state the id
  at position 0. Numbering each row's documents from 0 (as backend.ssd does for mamba_ssm) keeps ours, where only
  equal ids matter.
- the new state: the library returns one only without seq_idx; otherwise it is conv.carried_inputs (only the last
  document's inputs), as the Triton path returns it.
"""

from __future__ import annotations

import functools
import re

import torch
from torch import Tensor

from ..conv import carried_inputs
from .grad_slots import claim, slot_of

NOT_INSTALLED = "not installed"
MIN_VERSION = (1, 7)  # a carried-in state with seq_idx arrived in 1.7.0 (1.6 refuses the pair)


@functools.cache
def load():
    """(the causal_conv1d module, "") or (None, why not): NOT_INSTALLED, or why an installed one is not used."""
    try:
        import causal_conv1d
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update  # noqa: F401 - both must import
    except ModuleNotFoundError as e:
        if e.name == "causal_conv1d":
            return None, NOT_INSTALLED
        return None, f"causal_conv1d is there but {e.name} is not (its CUDA extension unbuilt?): {e}"
    except Exception as e:  # built against another torch, a missing .so: the Triton kernel stands in
        return None, f"causal_conv1d does not import ({type(e).__name__}: {e})"
    version = getattr(causal_conv1d, "__version__", "0")
    if tuple(int(n) for n in re.findall(r"\d+", version)[:2]) < MIN_VERSION:
        return None, f"causal_conv1d {version} is older than {'.'.join(map(str, MIN_VERSION))}"
    return causal_conv1d, ""


@functools.cache
def available() -> bool:
    """True when causal_conv1d imports and CUDA is available (asked once: every conv call asks)."""
    return torch.cuda.is_available() and load()[0] is not None


def unsupported(u: Tensor, weight: Tensor) -> str | None:
    """Why causal_conv1d_fn would refuse (or misread) u, or None: its TORCH_CHECKs (csrc/causal_conv1d.cpp: channels
    and strides multiples of 8, width 2..4) and the 16-byte vector loads from u's first element that no check guards
    (a misaligned u would be a CUDA fault, not an error)."""
    d, k = u.size(-1), weight.size(-1)
    if u.stride(-1) != 1:
        return "unsupported: channels not contiguous"
    if d % 8 or u.stride(0) % 8 or u.stride(1) % 8:
        return f"unsupported: d {d} / strides {tuple(u.stride())} not multiples of 8"
    if not 2 <= k <= 4:
        return f"unsupported: kernel width {k}"
    if u.data_ptr() % 16:
        return "unsupported: u not 16-byte aligned"
    return None


def conv1d_silu(
    u: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor | None = None, seq_idx: Tensor | None = None,
    lib=None, return_state: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """backend.conv1d_silu through ``causal_conv1d_fn``: (silu(conv(u)) (b, l, d), new conv state (b, d, k-1) in u's
    dtype, or None unless ``return_state``). u must pass :func:`unsupported`. Differentiable in u, weight and bias
    (not in conv_state: the library's gradient for it is not used). ``lib``: the library module (default the
    installed one; tests pass a stand-in)."""
    lib = load()[0] if lib is None else lib
    x, w = u.transpose(1, 2), weight[:, 0, :]
    b = None if bias is None else bias.to(w.dtype)
    seq = None if seq_idx is None else (seq_idx - seq_idx[:, :1]).to(torch.int32).contiguous()
    init = None
    if conv_state is not None:
        init = conv_state.to(u.dtype)
        if init.stride(1) != 1:  # the kernel reads the state channel-last, (b, k-1, d) in memory
            init = init.transpose(1, 2).contiguous().transpose(1, 2)
    if init is not None and seq is None:
        out, final = lib.causal_conv1d_fn(x, w, b, initial_states=init, return_final_states=True, activation="silu")
        return out.transpose(1, 2), final
    out = _LibraryConv.apply(x, w, b, seq, init, lib, slot_of(u))
    return out.transpose(1, 2), carried_inputs(u, init, seq_idx, w.size(-1)) if return_state else None


class _LibraryConv(torch.autograd.Function):
    """causal_conv1d_fn's forward and backward (its ``cpp_functions``, SiLU on, no final state), the backward writing
    grad u into the split's gradient buffer when u is a piece of one (grad_slots.py), as mamba_ssm's fused path has
    it write into its one buffer: no copy of it in the split's backward."""

    @staticmethod
    def forward(ctx, x, w, b, seq, init, lib, slot):
        ctx.save_for_backward(x, w, b, seq, init)
        ctx.lib, ctx.slot = lib, slot
        return lib.cpp_functions.causal_conv1d_fwd_function(x, w, b, seq, init, None, True)

    @staticmethod
    def backward(ctx, dout):
        x, w, b, seq, init = ctx.saved_tensors
        dx = claim(ctx.slot, x.dtype)
        if dx is not None and unsupported(dx, w[:, None]) is not None:
            dx = None  # the buffer's columns break the kernel's layout rules: the library allocates, the split copies
        dx, dw, db, _ = ctx.lib.cpp_functions.causal_conv1d_bwd_function(
            x, w, b, dout, seq, init, None, None if dx is None else dx.transpose(1, 2), False, True
        )
        return dx, dw, db, None, None, None, None


def conv1d_silu_step(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None, lib=None) -> tuple[Tensor, Tensor]:
    """backend.conv1d_silu_step through ``causal_conv1d_update``: one token x (b, d) -> (silu(conv) (b, d), new conv
    state (b, d, k-1) in x's dtype). The library shifts the state in place, so it gets a copy: the caller's state is
    left as it was, as on the torch path. No gradients (the library has no backward)."""
    lib = load()[0] if lib is None else lib
    state = conv_state.to(x.dtype, copy=True)
    w = weight[:, 0, :]
    out = lib.causal_conv1d_update(x, state, w, None if bias is None else bias.to(w.dtype), activation="silu")
    return out, state
