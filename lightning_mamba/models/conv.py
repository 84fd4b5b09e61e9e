"""Depthwise causal convolution with a carried state and document boundaries."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_conv1d(
    u: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    conv_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
    return_state: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """u (b, l, d); weight (d, 1, k); conv_state (b, d, k-1): the k-1 inputs before u (zeros if None).

    Returns the convolution (b, l, d), before any activation, and the new conv_state (the last k-1
    inputs; None unless ``return_state``). With ``seq_idx`` (b, l) a tap that would reach into an earlier
    document is dropped, and the carried state is taken to belong to the document at position 0.
    """
    b, l, d = u.shape
    k = weight.size(-1)
    ut = u.transpose(1, 2)
    if conv_state is None:
        conv_state = ut.new_zeros(b, d, k - 1)
    full = torch.cat([conv_state.to(ut.dtype), ut], dim=-1)  # (b, d, k-1+l)
    if seq_idx is None:
        out = F.conv1d(full, weight.to(ut.dtype), None if bias is None else bias.to(ut.dtype), groups=d)
        return out.transpose(1, 2), carried_inputs(u, conv_state, None, k) if return_state else None

    seq_full = torch.cat([seq_idx[:, :1].expand(b, k - 1), seq_idx], dim=1)
    out = torch.zeros_like(ut) if bias is None else bias.to(ut.dtype)[None, :, None].expand_as(ut)
    for lag in range(k):  # tap k-1-lag looks `lag` steps back (conv1d is a cross-correlation)
        start = k - 1 - lag
        same_doc = (seq_full[:, start:start + l] == seq_idx)[:, None, :]
        out = out + weight[:, 0, k - 1 - lag].to(ut.dtype)[None, :, None] * full[:, :, start:start + l] * same_doc
    return out.transpose(1, 2), carried_inputs(u, conv_state, seq_idx, k) if return_state else None


def carried_inputs(u: Tensor, conv_state: Tensor | None, seq_idx: Tensor | None, k: int) -> Tensor:
    """The conv state after u (b, l, d): its last k-1 inputs (b, d, k-1), reaching into ``conv_state`` when
    l < k-1; with ``seq_idx`` only the last document's inputs (zeros elsewhere), so a continuation never mixes
    documents."""
    b, l, d = u.shape
    state = u[:, max(l - (k - 1), 0):].transpose(1, 2)
    if l < k - 1:
        before = u.new_zeros(b, d, k - 1) if conv_state is None else conv_state.to(u.dtype)
        state = torch.cat([before[:, :, l:], state], dim=-1)
    if seq_idx is not None:
        seq_full = torch.cat([seq_idx[:, :1].expand(b, k - 1), seq_idx], dim=1)
        state = state * (seq_full[:, seq_full.size(1) - (k - 1):] == seq_idx[:, -1:])[:, None, :]
    return state.contiguous()


def conv_step(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """One token of :func:`causal_conv1d` (decoding): x (b, d), conv_state (b, d, k-1) -> the convolution (b, d),
    before any activation, and the new conv_state (b, d, k-1) in x's dtype; conv_state itself is left as it was."""
    window = torch.cat([conv_state.to(x.dtype), x[:, :, None]], dim=-1)  # (b, d, k)
    out = (window * weight[:, 0].to(x.dtype)).sum(-1)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out, window[:, :, 1:]
