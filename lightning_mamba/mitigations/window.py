"""Exact sliding window by state difference: each position sees only its last ``r`` tokens.

For one mixer, the windowed output at t is what a fresh run (zero SSM state, zero conv state) over tokens
[t-r+1, t] gives at t, and the windowed state is that run's final state. With s = t-r+1 and
alpha_{i:t} = prod_{j=i+1..t} alpha_j (the paper's notation), the state of the full run satisfies

    h_t = alpha_{s-1:t} h_{s-1} + sum_{tau=s..t} alpha_{tau:t} X_tau B_tau^T,    X = x * dt,

so h_t - g_t, with g_t = alpha_{t-r:t} h_{t-r}, is the sum over the window. g is itself an SSD scan:
g_t = alpha_t g_{t-1} + w_t X_{t-r} B_{t-r}^T, with w_t = alpha_{t-r:t} (the running sum of dt*A over the window,
kept in fp64). Both scans run with the chosen backend's ``ssd`` and carry their states across pieces; the inputs
delayed by r need the last r tokens of the previous piece, which the :class:`WindowState` carries.

The convolution: in a fresh run over the window, the first d_conv-1 tokens of the window see zero-padded conv
inputs, so their x and B (and, for r < d_conv, also C and the D-skip x at t itself) differ from the full run's.
For each offset m < d_conv-1 in the window this is a single rank-one term per position, so the exact fix is
direct (no scan): add alpha_{tau:t} (X^(m)_tau B^(m)_tau^T - X_tau B_tau^T) at tau = s+m, where ^(m) means the
conv with only its first m+1 taps (lags 0..m). For r < d_conv the output also uses C and x from the conv
truncated to r taps. Document resets (seq_idx) work as in the mixer: the window never reaches into an earlier
document (g's delayed input, the corrections and the conv taps are dropped across a reset).

Memory is constant in the sequence length: per layer the last r + d_conv - 1 pre-conv inputs and dt's, and three
states (full, g, windowed). Cost: about two scans plus O(d_conv) elementwise passes per token. In fp32 the
difference h_t - g_t cancels where both are large; its error is ~1e-7 of |h_t| (float64 tests agree to 1e-10).

Model level: every layer is windowed, so layer 1 at t sees tokens [t-r+1, t], but layer 2 sees layer-1 outputs
at [t-r+1, t], each of which saw r tokens: the model's receptive field is n_layer*(r-1)+1 tokens (as stacked
sliding-window attention). The windowed model is therefore *not* the plain model run fresh on the last r tokens;
what holds exactly is the per-layer identity above, and that the windowed model's logits at t equal those of the
windowed model run on the last n_layer*(r-1)+1 tokens alone (the paper applies the window per layer to the state).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.kernels import backend as kernels
from ..models.mixer import Mamba2
from ..models.ssd import _heads


class WindowState(NamedTuple):
    """What a windowed layer carries. ``conv`` and ``ssm`` mean what they mean in LayerState (ssm: the windowed
    state, as a fresh run over the last r tokens would end with), so state statistics read it unchanged."""

    conv: Tensor  # (b, conv_dim, d_conv-1): last pre-conv inputs of the current document
    ssm: Tensor  # (b, h, p, n) windowed state h^(r)
    full: Tensor  # (b, h, p, n) the full run's state h_t
    g: Tensor  # (b, h, p, n) alpha_{t-r:t} h_{t-r}
    raw: Tensor  # (b, r+d_conv-1, conv_dim) pre-conv inputs of the last tokens (zeros before the start)
    dt_raw: Tensor  # (b, r+d_conv-1, h) their dt before softplus
    doc: Tensor  # (b, r+d_conv-1) int64 document index relative to the last token (0); -1.. = earlier or none


class SlidingWindow:
    """The mixer's ``forward_override`` for a window of ``r`` tokens (set by ``apply_interventions(window=r)``)."""

    def __init__(self, r: int):
        if r < 1:
            raise ValueError(f"window must be >= 1 token (got {r})")
        self.r = r

    def __call__(self, mixer: Mamba2, u, state=None, seq_idx=None, record=None):
        return windowed_forward(mixer, u, self.r, state, seq_idx, record)

    def __repr__(self) -> str:
        return f"SlidingWindow(r={self.r})"


def empty_window_state(mixer: Mamba2, batch: int, r: int, device=None, dtype=torch.float32) -> WindowState:
    E, ct = r + mixer.d_conv - 1, torch.promote_types(dtype, torch.float32)
    zeros = torch.zeros(batch, mixer.nheads, mixer.headdim, mixer.d_state, device=device, dtype=ct)
    return WindowState(
        conv=torch.zeros(batch, mixer.conv_dim, mixer.d_conv - 1, device=device, dtype=dtype),
        ssm=zeros, full=zeros, g=zeros,
        raw=torch.zeros(batch, E, mixer.conv_dim, device=device, dtype=dtype),
        dt_raw=torch.zeros(batch, E, mixer.nheads, device=device, dtype=dtype),
        doc=torch.full((batch, E), -1, dtype=torch.long, device=device),  # no document: nothing before the start
    )


def _conv_taps(raw: Tensor, docs: Tensor, weight: Tensor, bias: Tensor | None, lo: int, hi: int, taps: int) -> Tensor:
    """Depthwise causal conv at positions [lo, hi) of raw (b, N, d) from lags 0..taps-1 only, never across a
    document: what a fresh run whose window starts taps-1 tokens back computes there (taps = d_conv: the full conv)."""
    k = weight.size(-1)
    w = weight[:, 0].to(raw.dtype)  # (d, k); conv1d is a cross-correlation: tap k-1-lag looks `lag` back
    shape = (raw.size(0), hi - lo, raw.size(2))
    out = raw.new_zeros(shape) if bias is None else bias.to(raw.dtype).expand(shape)
    for lag in range(taps):
        same = (docs[:, lo - lag:hi - lag] == docs[:, lo:hi])[..., None]
        out = out + w[:, k - 1 - lag] * raw[:, lo - lag:hi - lag] * same
    return out


def windowed_forward(mixer: Mamba2, u: Tensor, r: int, state: WindowState | None = None,
                     seq_idx: Tensor | None = None, record: dict | None = None) -> tuple[Tensor, WindowState]:
    """Mixer forward with an exact window of ``r`` tokens: u (b, l, d_model) -> (out, WindowState).
    Arguments as :meth:`Mamba2.forward`; ``state`` must come from an earlier windowed piece (or None)."""
    b, l, _ = u.shape
    k, h = mixer.d_conv, mixer.nheads
    E, off = r + k - 1, k - 1  # history carried; ext position i <-> index j = i - off in the conv'd arrays
    z, xBC, dt_raw = mixer._split(mixer.in_proj(u))
    doc = (torch.zeros(b, l, dtype=torch.long, device=u.device) if seq_idx is None
           else (seq_idx - seq_idx[:, :1]).long())  # a carried state belongs to the document at position 0
    if state is None:
        state = empty_window_state(mixer, b, r, u.device, xBC.dtype)
    elif not isinstance(state, WindowState) or state.raw.size(1) != E:
        raise TypeError(f"a windowed run (r={r}) continues only from its own WindowState; start from state=None")
    raw = torch.cat([state.raw.to(xBC.dtype), xBC], 1)  # (b, N, conv_dim), N = E + l
    draw = torch.cat([state.dt_raw.to(dt_raw.dtype), dt_raw], 1)
    docs = torch.cat([state.doc, doc], 1)
    N = E + l
    weight, bias = mixer.conv1d.weight, mixer.conv1d.bias

    def params(taps: int, lo: int, hi: int):
        return mixer._ssm_params(F.silu(_conv_taps(raw, docs, weight, bias, lo, hi, taps)), draw[:, lo:hi])

    x, B, C, dt, A, xs = params(k, off, N)  # the full run at ext [k-1, N): j in [0, r+l); the piece is j >= r
    ct = torch.promote_types(dt.dtype, torch.float32)
    X = xs.to(ct) * dt[..., None]
    cum = torch.cumsum((dt * A).double(), 1)  # running log decay; differences give window products
    if r >= k:
        xw, Cw = x[:, r:], C[:, r:]
    else:  # the output position itself is within the first d_conv-1 tokens of its window
        xw, _, Cw, *_ = params(r, E, N)
    dtP = dt[:, r:].clamp_min(torch.finfo(dt.dtype).tiny)  # g's input divides by dt (0 only on underflow)
    sidx = None if seq_idx is None else doc
    if record is not None:
        record["dt"], record["A"] = dtP.detach(), A.detach()

    # full run h, and g_t = alpha_{t-r:t} h_{t-r}: input w_t X_{t-r} B_{t-r}^T, dropped across documents
    y_h, full = kernels.ssd(mixer.backend, xs[:, r:].to(ct), dtP, A, B[:, r:], Cw, mixer.chunk_size,
                            initial_state=state.full, seq_idx=sidx)
    same = (docs[:, off:N - r] == doc)[..., None, None]
    w = torch.exp(cum[:, r:] - cum[:, :l]).to(ct)  # (b, l, h)
    x_g = torch.where(same, X[:, :l] * (w / dtP)[..., None], 0.0)
    y_g, g = kernels.ssd(mixer.backend, x_g, dtP, A, B[:, :l], Cw, mixer.chunk_size,
                         initial_state=state.g, seq_idx=sidx)

    # conv corrections for the first d_conv-1 tokens of each window (tau = t-r+1+m, rank one each)
    y, hw = y_h.to(ct) - y_g.to(ct), full - g
    Cw_h = _heads(Cw.to(ct), h)
    for m in range(min(k - 1, r)):
        lo = off + 1 + m  # ext index of tau for the first piece position; j_tau = j - r + 1 + m
        xm, Bm, _, dtm, _, xsm = params(m + 1, lo, lo + l)
        Xm, Xf = xsm.to(ct) * dtm[..., None], X[:, 1 + m:1 + m + l]
        Bm, Bf = _heads(Bm.to(ct), h), _heads(B[:, 1 + m:1 + m + l].to(ct), h)
        keep = (docs[:, lo:lo + l] == doc)[..., None]
        coef = torch.where(keep, torch.exp(cum[:, r:] - cum[:, 1 + m:1 + m + l]).to(ct), 0.0)  # alpha_{tau:t}
        y = y + coef[..., None] * (Xm * (Bm * Cw_h).sum(-1, keepdim=True) - Xf * (Bf * Cw_h).sum(-1, keepdim=True))
        hw = hw + coef[:, -1, :, None, None] * (Xm[:, -1, :, :, None] * Bm[:, -1, :, None, :]
                                                - Xf[:, -1, :, :, None] * Bf[:, -1, :, None, :])

    conv = raw[:, N - off:].transpose(1, 2) * (docs[:, N - off:] == docs[:, -1:])[:, None, :]
    new = WindowState(conv=conv, ssm=hw, full=full, g=g, raw=raw[:, N - E:], dt_raw=draw[:, N - E:],
                      doc=docs[:, N - E:] - docs[:, -1:])
    return mixer._finish(y.to(xw.dtype), xw, z), new
