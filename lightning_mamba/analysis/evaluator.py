"""Long-context evaluation: per-position loss in pieces with the state carried, and loss-vs-position curves.

A row of L tokens gives L-1 next-token losses; the loss at index i predicts token i+1 from tokens 0..i, so
it sits at *position* i+1 (the number of tokens seen). Positions 1..T_train are the training window
(training samples are T_train inputs long, starting from a zero state).

Memory stays constant in L: the model runs on ``piece_len`` tokens at a time and hands its state on,
which gives the same numbers as one forward over the whole row (the pieces are exact, not a window).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..atomic import atomic_write_text
from ..models.mixer import LayerState

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is unknown: use float32 (the paper's analysis precision) or bfloat16")
    return DTYPES[dtype]


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def precision_context(device: torch.device, dtype: torch.dtype):
    """fp32: autocast explicitly off (analysis runs may be called from inside a bf16-mixed trainer);
    bf16/fp16: autocast to that dtype (dt and alpha stay fp32 inside the mixer either way)."""
    if dtype == torch.float32:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Piece:
    """One step of a piecewise run: inputs [start, end) of the row were just consumed."""

    start: int
    end: int
    logits: Tensor | None  # (b, end-start, padded_vocab); None when the run skips the output layer
    state: list  # the carried state after position ``end`` (list of LayerState)
    record: list[dict] | None  # per layer {"dt": (b, l, h), "A": (h,)} when asked for


def iter_pieces(
    model: torch.nn.Module,
    input_ids: Tensor,
    piece_len: int,
    dtype: str | torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    record: bool = False,
    extra_ends: tuple[int, ...] = (),
    logits: bool = True,
) -> Iterator[Piece]:
    """Run ``model`` over ``input_ids`` (b, L) ``piece_len`` tokens at a time, carrying the state.

    Pieces also end at each of ``extra_ends`` (e.g. T_train, so a state is seen exactly there).
    ``logits=False`` skips the output layer (most of a small model's work) for callers that only read states.
    Yields after each piece; nothing of earlier pieces is kept, so memory does not grow with L."""
    if piece_len < 1:
        raise ValueError(f"piece_len must be >= 1 (got {piece_len})")
    dtype = resolve_dtype(dtype)
    device = torch.device(device) if device is not None else _model_device(model)
    n = input_ids.size(1)
    ends = sorted({*range(piece_len, n, piece_len), n, *(e for e in extra_ends if 0 < e < n)})
    state, start = None, 0
    with torch.no_grad(), precision_context(device, dtype):
        for end in ends:
            ids = input_ids[:, start:end].to(device)
            rec = [] if record else None
            if logits:
                out, state = model(ids, state=state, record=rec)
            else:
                _, state = model.hidden_states(ids, state=state, record=rec)
                out = None
            yield Piece(start, end, out, state, rec)
            start = end


def iter_state_samples(
    model: torch.nn.Module,
    input_ids: Tensor,
    stride: int,
    dtype: str | torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    extra_ends: tuple[int, ...] = (),
) -> Iterator[Piece]:
    """The pieces :func:`iter_pieces` yields with ``record=True, logits=False`` (state after every ``stride`` tokens
    and at ``extra_ends``; per-step dt and A of the piece), computed in one pass when possible: the scan keeps its
    state every ``stride`` tokens (``Mamba2.states_every``). Pieces then carry only the SSM state (conv None).
    Falls back to the piecewise run when a mixer rewrites its carried state or its forward (interventions,
    sliding window) or an extra end is not a multiple of ``stride``."""
    n = input_ids.size(1)
    mixers = getattr(model, "mixers", None)
    one_pass = (
        stride >= 1 and mixers is not None
        and all(m.state_hook is None and m.forward_override is None for m in mixers)
        and all(e % stride == 0 for e in extra_ends if 0 < e < n)
    )
    if not one_pass:
        yield from iter_pieces(model, input_ids, stride, dtype, device, record=True, extra_ends=extra_ends, logits=False)
        return
    dtype = resolve_dtype(dtype)
    device = torch.device(device) if device is not None else _model_device(model)
    records: list[dict] = []
    try:
        for m in mixers:
            m.states_every = stride
        with torch.no_grad(), precision_context(device, dtype):
            model.hidden_states(input_ids.to(device), record=records)
    finally:
        for m in mixers:
            m.states_every = None
    for k, start in enumerate(range(0, n, stride)):
        end = min(start + stride, n)
        yield Piece(start, end, None, [LayerState(None, r["states"][:, k]) for r in records],
                    [{"dt": r["dt"][:, start:end], "A": r["A"]} for r in records])


def token_losses(
    model: torch.nn.Module,
    tokens: Tensor,
    piece_len: int = 2048,
    dtype: str | torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """Per-position next-token loss (b, L-1), fp32, on CPU, for rows ``tokens`` (b, L).

    Entry [r, i] is the loss of predicting tokens[r, i+1] from tokens[r, :i+1] (position i+1).
    ``dtype`` float32 is the paper's analysis precision; bfloat16 runs under autocast. ``batch_size`` rows
    go through the model at a time (default: all); logits take batch_size x piece_len x vocab floats."""
    if tokens.dim() != 2 or tokens.size(1) < 2:
        raise ValueError(f"tokens must be (batch, length >= 2); got shape {tuple(tokens.shape)}")
    tokens = tokens.long()
    out = torch.empty(tokens.size(0), tokens.size(1) - 1, dtype=torch.float32)
    for r in range(0, tokens.size(0), batch_size or tokens.size(0)):
        rows = tokens[r:r + (batch_size or tokens.size(0))]
        for p in iter_pieces(model, rows[:, :-1], piece_len, dtype, device):
            targets = rows[:, p.start + 1:p.end + 1].to(p.logits.device)
            loss = F.cross_entropy(p.logits.float().transpose(1, 2), targets, reduction="none")
            out[r:r + rows.size(0), p.start:p.end] = loss.cpu()
    return out


def bucket_curve(losses: Tensor | np.ndarray, bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """Bucket means of per-position losses (b, n) or (n,), averaged over rows.

    Returns (positions, means): bucket k covers positions k*bucket+1 .. (k+1)*bucket and is reported at its
    *last* position (k+1)*bucket, so "within the first T positions" is exactly "position <= T" when
    ``bucket`` divides T. A last, shorter bucket is kept (its mean is over fewer positions)."""
    if bucket < 1:
        raise ValueError(f"bucket must be >= 1 (got {bucket})")
    x = torch.as_tensor(losses, dtype=torch.float64)
    if x.dim() == 1:
        x = x[None]
    per_pos = x.mean(0).numpy()  # average over documents first
    n = per_pos.shape[0]
    ends = np.minimum(np.arange(bucket, n + bucket, bucket), n)
    starts = np.arange(0, n, bucket)
    means = np.array([per_pos[s:e].mean() for s, e in zip(starts, ends)])
    return ends.astype(np.int64), means


def window_mean(losses: Tensor | np.ndarray, lo: int, hi: int) -> float | None:
    """Mean loss over positions (lo, hi] (1-based, as above), over rows; None if the row is shorter than hi."""
    x = torch.as_tensor(losses, dtype=torch.float64)
    if x.dim() == 1:
        x = x[None]
    if x.size(1) < hi or hi <= lo:
        return None
    return float(x[:, lo:hi].mean())


def eval_rows(
    stream: np.ndarray | Tensor | list[int],
    length: int,
    n_rows: int,
    eos_id: int | None = None,
) -> tuple[Tensor, dict]:
    """Up to ``n_rows`` consecutive, non-overlapping windows of ``length`` tokens from a flat token stream.

    The stream is documents joined with EOS and is used as is (no reset, as the paper evaluates). A stream
    too short for one row is repeated end to start (with ``eos_id`` between copies when given and not
    already there); ``info["repeated"]`` says how many copies were used, ``info["note"]`` says it in words.
    Returns (rows (n, length) int64, info)."""
    if length < 2 or n_rows < 1:
        raise ValueError(f"need length >= 2 and n_rows >= 1 (got length={length}, n_rows={n_rows})")
    s = np.asarray(stream[: length * n_rows], dtype=np.int64).reshape(-1)  # slice first: streams may be memmaps
    if s.size == 0:
        raise ValueError("the evaluation token stream is empty")
    info: dict = {"stream_tokens": int(len(stream)), "length": length, "repeated": 1, "note": ""}
    if s.size < length:
        unit = s if eos_id is None or s[-1] == eos_id else np.append(s, eos_id)
        copies = -(-length // unit.size)
        s = np.tile(unit, copies)
        info["repeated"] = copies
        info["note"] = (f"held-out stream has {info['stream_tokens']} tokens < row length {length}: "
                        f"repeated it {copies} times (documents concatenated without reset, as the paper)")
    n = min(n_rows, s.size // length)
    info["rows"] = n
    if n < n_rows:
        info["note"] = (info["note"] + "; " if info["note"] else "") + short_stream_note(
            n, n_rows, length, info["stream_tokens"])
    rows = torch.from_numpy(s[: n * length].reshape(n, length).copy())
    return rows, info


def short_stream_note(n: int, n_rows: int, length: int, stream_tokens: int) -> str:
    """What to change when only ``n`` of ``n_rows`` rows of ``length`` tokens fit in a held-out stream: each of the
    three ways to average all rows, with its number and the setting it is in (commands, callbacks, study)."""
    need = n_rows * length
    most = stream_tokens // n_rows  # the longest rows of which n_rows fit
    return (f"only {n} of {n_rows} rows of {length} tokens fit in the held-out stream ({stream_tokens} tokens): "
            "give more held-out text or evaluate a shorter length, or ask for fewer rows. "
            f"To average {n_rows} rows, give at least {need} held-out tokens ({need / max(stream_tokens, 1):.2f}x as "
            "many: a data.val_fraction that much larger when training, or more text with --text), or evaluate at most "
            f"{max(most - 1, 1)} positions per row (--length; fewer multiples or max_eval_tokens in the callbacks; "
            f"eval_multiple or eval_tokens in a study); or ask for {n} rows (--n_rows; the callbacks' n_rows; a "
            f"study's eval_n_rows). As it is, the averages (and the ratio's interval) rest on {n} rows")


def write_position_losses_csv(path: str, per_position) -> None:
    """``position,loss`` rows (position 1 = the loss of predicting the second token), written atomically."""
    lines = ["position,loss"] + [f"{i},{x:.6g}" for i, x in enumerate(per_position, start=1)]
    atomic_write_text(path, "\n".join(lines) + "\n")
