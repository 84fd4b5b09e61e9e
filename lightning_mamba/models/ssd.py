"""State space duality (SSD) in pure PyTorch: the chunked scan and the one-step recurrence.

Per head h, with alpha_t = exp(dt_t * A_h):
    state_t = alpha_t * state_{t-1} + dt_t * outer(x_t, B_t)      (headdim P x d_state N)
    y_t     = state_t @ C_t
The chunked form (Dao & Gu, 2024; official ``ssd_minimal.py``) computes the same thing with matmuls.
Document resets: where ``seq_idx`` changes the state restarts from zero. A carried ``initial_state``
belongs to the document at position 0. Everything is computed in fp32 at least (the paper analyses in
fp32); float64 inputs stay float64, which the tests use for tight comparisons.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import NO_DT_LIMIT
from .precision import autocast_dtype

_MASKS: dict = {}


def _tril_masks(T: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(on or above the diagonal, strictly above it) boolean masks (the complements of strictly below /
    on or below), cached by (T, device)."""
    key = (T, device)
    m = _MASKS.get(key)
    if m is None:
        m = (
            ~torch.tril(torch.ones(T, T, dtype=torch.bool, device=device), diagonal=-1),
            ~torch.tril(torch.ones(T, T, dtype=torch.bool, device=device), diagonal=0),
        )
        _MASKS[key] = m
    return m


def segsum(x: Tensor) -> Tensor:
    """out[..., i, j] = sum_{k=j+1..i} x[..., k] for j <= i, -inf above the diagonal (stable form)."""
    T = x.size(-1)
    not_below, above = _tril_masks(T, x.device)
    x = x[..., None].expand(*x.shape, T)  # [..., i, j] = x_i
    x = torch.where(not_below, x.new_zeros(()), x)
    out = torch.cumsum(x, dim=-2)
    return out.masked_fill_(above, float("-inf"))  # in place: cumsum's backward does not need its output


class _SegsumExp(torch.autograd.Function):
    """exp(segsum(x)) (zero above the diagonal) from differences of one cumsum, with a hand-written backward.

    With cs = cumsum(x), exp(S[i, j]) = exp(cs[i] - cs[j]) for j <= i: O(L) cumsum instead of the stable form's
    O(L^2) one (mamba_ssm's kernels do the same; in fp32 the exponent's rounding is ~|cs| * 1e-7). With
    M = grad * out, d/d cs[i] = sum_j M[i, j] - sum_k M[k, i], and grad_x is its reverse cumsum."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        _, above = _tril_masks(x.size(-1), x.device)
        with torch.no_grad():
            cs = torch.cumsum(x, dim=-1)
            out = torch.exp(cs[..., :, None] - cs[..., None, :]).masked_fill_(above, 0.0)  # inf above: replaced
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (out,) = ctx.saved_tensors
        m = grad * out  # zero above the diagonal
        g_cs = m.sum(-1) - m.sum(-2)
        g = g_cs.flip(-1).cumsum(-1).flip(-1)  # grad_x[k] = sum_{i >= k} g_cs[i]
        g[..., 0] = 0.0  # x[0] cancels from every difference (exactly 0, not a rounding residue)
        return g


def positive_dt(dt_raw: Tensor, dt_bias: Tensor, dt_limit: tuple[float, float] = NO_DT_LIMIT) -> Tensor:
    """The step size the scan uses: softplus(dt_raw + dt_bias) in fp32 at least (softplus's threshold 20, as the
    kernels'), clamped to ``dt_limit``."""
    ct = torch.promote_types(dt_raw.dtype, torch.float32)
    dt = F.softplus(dt_raw.to(ct) + dt_bias.to(ct))
    if tuple(dt_limit) != NO_DT_LIMIT:
        dt = dt.clamp(*dt_limit)
    return dt


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _operand_dtype(t: Tensor) -> torch.dtype:
    """The dtype of a tensor that feeds only matmuls (B, C): autocast's when it is on (the matmul casts to it
    anyway, so a cast to fp32 first would only copy the d_state-wide tensor there and back, to the same values),
    else the compute dtype."""
    return autocast_dtype(t.device.type) or _compute_dtype(t)


def _heads(t: Tensor, nheads: int) -> Tensor:
    """Expand group tensors (b, l, g, n) to per-head (b, l, h, n): head h uses group h // (h/g)."""
    return t.repeat_interleave(nheads // t.size(2), dim=2)


def _chunk_decay(dA: Tensor, seq_idx: Tensor | None) -> Tensor:
    """alpha_{j+1..i} inside each chunk, zero across documents: dA (b, c, h, s) log alpha, seq_idx (b, c, s) or None
    -> (b, c, h, s, s) (chunk-major for the bmm)."""
    decay = _SegsumExp.apply(dA.contiguous())
    if seq_idx is not None:
        decay = decay * (seq_idx[:, :, :, None] == seq_idx[:, :, None, :]).unsqueeze(2)
    return decay


def _within_chunks(C: Tensor, B: Tensor, X: Tensor, decay: Tensor) -> Tensor:
    """y_i = sum_{j<=i} (C_i . B_j) decay[i, j] X_j in each chunk: C, B (b, c, s, g, n); X = x * dt
    (b, c, s, g, r, p), head g * r + k is X[..., g, k, :]; decay (b, c, h, s, s) -> y (b, c, s, g, r, p)."""
    b, c, s, g, r, _ = X.shape
    CB = torch.einsum("bclgn,bcsgn->bcgls", C, B)  # once per group, shared by its heads
    scores = decay.view(b, c, g, r, s, s) * CB[:, :, :, None]  # (b, c, g, r, l, s)
    return torch.einsum("bcgrls,bcsgrp->bclgrp", scores, X)


def _chunk_end_states(B: Tensor, X: Tensor, decay_to_end: Tensor) -> Tensor:
    """The state each chunk adds, as seen at its end: sum_j decay_to_end[j] X_j outer B_j. B (b, c, s, g, n);
    X (b, c, s, g, r, p); decay_to_end (b, c, s, h) -> (b, c, h, p, n)."""
    b, c, s, g, r, p = X.shape
    Xd = X * decay_to_end.reshape(b, c, s, g, r, 1)
    return torch.einsum("bclgn,bclgrp->bcgrpn", B, Xd).reshape(b, c, g * r, p, B.size(-1))


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    initial_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
    return_chunk_states: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Chunked SSD scan.

    x (b, l, h, p); dt (b, l, h), already positive; A (h,), negative; B, C (b, l, g, n);
    initial_state (b, h, p, n); seq_idx (b, l) non-decreasing ints.
    Returns y (b, l, h, p) in x's dtype (without the D skip) and the final state (b, h, p, n) in fp32;
    with ``return_chunk_states`` also the state at the end of every chunk (b, ceil(l / chunk_size), h, p, n),
    the last one being the final state (analysis: states every chunk_size tokens from one pass).
    """
    b, l, h, p = x.shape
    out_dtype = x.dtype
    pad = (-l) % chunk_size
    # Padding with dt = 0 means alpha = 1 and no input: states and outputs are unchanged.
    ct = _compute_dtype(x)

    def prep(t: Tensor) -> Tensor:
        t = t.to(ct)
        return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) if pad else t

    x, dt, B, C = (prep(t) for t in (x, dt, B, C))
    if seq_idx is not None and pad:
        seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1)
    L = l + pad
    c, s = L // chunk_size, chunk_size
    g, n = B.size(2), B.size(-1)
    r = h // g  # heads per group: head h uses group h // r

    X = (x * dt[..., None]).view(b, c, s, g, r, p)
    B = B.reshape(b, c, s, g, n)
    C = C.reshape(b, c, s, g, n)
    dA = (dt * A.to(ct)).view(b, c, s, h).permute(0, 3, 1, 2)  # (b, h, c, s): log alpha
    dA_cs = torch.cumsum(dA, dim=-1)

    if seq_idx is not None:
        sc = seq_idx.view(b, c, s)
        # Document of each state index: 0 = the initial state (doc at position 0), z = end of chunk z-1.
        ends = torch.cat([sc[:, :1, 0], sc[:, :, -1]], dim=1)  # (b, c+1)

    # 1. Within chunks: y_i = sum_{j<=i} (C_i . B_j) alpha_{j+1..i} X_j
    decay = _chunk_decay(dA.transpose(1, 2), None if seq_idx is None else sc)
    y = _within_chunks(C, B, X, decay)

    # 2. The state each chunk adds, as seen at its end.
    decay_to_end = torch.exp(dA_cs[..., -1:] - dA_cs)  # (b, h, c, s)
    if seq_idx is not None:
        decay_to_end = decay_to_end * (sc == sc[:, :, -1:]).unsqueeze(1)
    chunk_states = _chunk_end_states(B, X, decay_to_end.permute(0, 2, 3, 1))

    # 3. Pass states across chunks.
    if initial_state is None:
        initial_state = x.new_zeros(b, h, p, n)
    states = torch.cat([initial_state.to(ct)[:, None], chunk_states], dim=1)  # (b, c+1, h, p, n)
    chunk_decay = torch.exp(segsum(F.pad(dA_cs[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    if seq_idx is not None:
        chunk_decay = chunk_decay * (ends[:, :, None] == ends[:, None, :]).unsqueeze(1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    chunk_end_states = states[:, 1:] if return_chunk_states else None
    states, final_state = states[:, :-1], states[:, -1]

    # 4. What the carried-in state contributes to each position.
    decay_from_start = torch.exp(dA_cs)  # (b, h, c, s)
    if seq_idx is not None:
        decay_from_start = decay_from_start * (sc == ends[:, :-1, None]).unsqueeze(1)
    y_off = torch.einsum("bclgn,bcgrpn->bclgrp", C, states.reshape(b, c, g, r, p, n))
    y = y + y_off * decay_from_start.permute(0, 2, 3, 1).reshape(b, c, s, g, r, 1)

    y = y.reshape(b, L, h, p)
    if pad:
        y = y[:, :l]
    if return_chunk_states:
        return y.to(out_dtype), final_state, chunk_end_states
    return y.to(out_dtype), final_state


def ssd_quadratic(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    seq_idx: Tensor | None = None,
    return_final_state: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """:func:`ssd_chunked` from a zero initial state as one chunk the length of the input: the SSD's attention form
    y_t = sum_{s <= t, same document} (C_t . B_s) alpha_{s+1..t} dt_s x_s, with no state in between (no padding to
    a chunk, no per-chunk states). Memory O(b h l^2): for short inputs (l <= ~256).

    Arguments and returns as ssd_chunked's; the final state (b, h, p, n), that of the row's last document, is
    computed only when ``return_final_state`` (else None): it is the one b*h*p*n tensor this form would need."""
    b, l, h, p = x.shape
    ct = _compute_dtype(x)
    g = B.size(2)
    X = (x.to(ct) * dt.to(ct)[..., None]).view(b, 1, l, g, h // g, p)  # one chunk: (b, c=1, l, g, r, p)
    bc = _operand_dtype(B)
    B, C = B.to(bc)[:, None], C.to(bc)[:, None]
    dA = (dt.to(ct) * A.to(ct)).transpose(1, 2)[:, None]  # (b, 1, h, l): log alpha
    decay = _chunk_decay(dA, None if seq_idx is None else seq_idx[:, None])  # (b, 1, h, l, l)
    y = _within_chunks(C, B, X, decay).reshape(b, l, h, p).to(x.dtype)
    if not return_final_state:
        return y, None
    # the decay's last row is alpha_{s+1..L} for s in the last document and zero before it
    decay_to_end = decay[:, :, :, -1].transpose(2, 3)  # (b, 1, l, h)
    return y, _chunk_end_states(B, X, decay_to_end)[:, 0]


def ssd_sampling_states(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    every: int,
    max_chunk: int,
    initial_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`ssd_chunked` that also returns the state after every ``every`` tokens and after the last one
    (b, ceil(l / every), h, p, n): one pass instead of one scan per piece. The scan's chunk is ``every``, halved
    while above ``max_chunk`` so its L x L blocks stay small (the result does not depend on the chunk)."""
    chunk = every
    while chunk > max_chunk and chunk % 2 == 0:
        chunk //= 2
    y, final_state, ends = ssd_chunked(x, dt, A, B, C, chunk, initial_state=initial_state, seq_idx=seq_idx,
                                       return_chunk_states=True)
    per = every // chunk  # ends[i] is the state after chunk i: keep every per-th, and the last
    last = ends.size(1) - 1
    keep = [i for i in range(ends.size(1)) if (i + 1) % per == 0 or i == last]
    return y, final_state, ends[:, keep]


def ssd_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """One recurrent step. state (b, h, p, n), fp32 or wider; x (b, h, p); dt (b, h); B, C (b, g, n).

    Returns y (b, h, p) in x's dtype and the new state."""
    h, ct = x.size(1), _compute_dtype(x)
    B = B.to(ct).repeat_interleave(h // B.size(1), dim=1)
    C = C.to(ct).repeat_interleave(h // C.size(1), dim=1)
    dt = dt.to(ct)
    alpha = torch.exp(dt * A.to(ct))  # (b, h)
    state = alpha[..., None, None] * state.to(ct) + (dt[..., None] * x.to(ct))[..., None] * B[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, C)
    return y.to(x.dtype), state


def ssd_recurrent(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    initial_state: Tensor | None = None,
    seq_idx: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Token-by-token reference of :func:`ssd_chunked` (same arguments, minus chunk_size). Slow; for tests."""
    b, l, h, p = x.shape
    ct = _compute_dtype(x)
    state = x.new_zeros(b, h, p, B.size(-1), dtype=ct) if initial_state is None else initial_state.to(ct)
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).to(state.dtype)
            state = state * keep[:, None, None, None]
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), state
