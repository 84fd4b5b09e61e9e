"""Long-context evaluation: per-position loss in pieces with the state carried, and loss-vs-position curves.

A row of L tokens gives L-1 next-token losses; the loss at index i predicts token i+1 from tokens 0..i, so
it sits at *position* i+1 (the number of tokens seen). Positions 1..T_train are the training window
(training samples are T_train inputs long, starting from a zero state).

Memory stays constant in L: the model runs on ``piece_len`` tokens at a time and hands its state on,
which gives the same numbers as one forward over the whole row (the pieces are exact, not a window).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..atomic import atomic_write_text
from ..models.mixer import LayerState

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "tf32": torch.float32}
# float32 tensors whose matmuls run on TF32 tensor cores (10-bit mantissa) on a GPU that has them; on a CPU without
# such units, plain float32. On CUDA, mamba_ssm's Triton scan already takes its float32 dot products in TF32 (Triton's
# default), so this moves the projections and the output layer to the scan's precision.
TF32 = "tf32"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is unknown: use float32 (the paper's analysis precision), tf32 (float32 "
                         f"with TF32 matmuls on a GPU) or bfloat16")
    return DTYPES[dtype]


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def precision_context(device: torch.device, dtype: str | torch.dtype):
    """fp32: autocast explicitly off (analysis runs may be called from inside a bf16-mixed trainer);
    ``"tf32"``: the same, with float32 matmuls on TF32 tensor cores for the block (torch's matmul precision
    "high", the caller's restored after); bf16/fp16: autocast to that dtype (dt and alpha stay fp32 inside the
    mixer either way)."""
    resolved = resolve_dtype(dtype)
    before = torch.get_float32_matmul_precision() if dtype == TF32 else None
    if before is not None:
        torch.set_float32_matmul_precision("high")
    try:
        if resolved == torch.float32:
            with torch.autocast(device_type=device.type, enabled=False):
                yield
        else:
            with torch.autocast(device_type=device.type, dtype=resolved):
                yield
    finally:
        if before is not None:
            torch.set_float32_matmul_precision(before)


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
    chunk_size: int | str | None = None,
) -> Iterator[Piece]:
    """Run ``model`` over ``input_ids`` (b, L) ``piece_len`` tokens at a time, carrying the state.

    Pieces also end at each of ``extra_ends`` (e.g. T_train, so a state is seen exactly there).
    ``logits=False`` skips the output layer (most of a small model's work) for callers that only read states.
    ``chunk_size``: the scan's chunk for these pieces (:func:`run_carried`).
    Yields after each piece; nothing of earlier pieces is kept, so memory does not grow with L."""
    if piece_len < 1:
        raise ValueError(f"piece_len must be >= 1 (got {piece_len})")
    ends = sample_ends(input_ids.size(1), piece_len, extra_ends)
    for start, end, out, state, rec in run_carried(model, input_ids, ends, dtype, device, record, logits,
                                                   chunk_size=chunk_size):
        yield Piece(start, end, out, state, rec)


def sample_ends(n: int, every: int, extra_ends: tuple[int, ...] = ()) -> list[int]:
    """The positions a run over ``n`` tokens stops at: every ``every`` tokens, at each extra end inside (0, n), and
    at n, in order."""
    return sorted({*range(every, n, every), n, *(e for e in extra_ends if 0 < e < n)})


def run_carried(
    model: torch.nn.Module,
    input_ids: Tensor,
    ends: list[int],
    dtype: str | torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    record: bool = False,
    logits: bool = True,
    states_every: int | None = None,
    chunk_size: int | str | None = None,
) -> Iterator[tuple[int, int, Tensor | None, list, list[dict] | None]]:
    """The state-carrying loop of :func:`iter_pieces` and :func:`iter_state_samples`: run ``model`` on
    ``input_ids[:, start:end]`` for consecutive ``ends`` (increasing, the last one the length), each run starting
    from the state (SSM and conv) the previous one handed on, and yield (start, end, logits or None, state, record
    or None) after each. ``states_every``: each run's mixers also keep their SSM state every that many tokens from
    the run's start, and after its last token, in ``record[layer]["states"]`` (``Mamba2.states_every``; set for the
    run only, never while the caller holds a yield); the carried SSM and conv states are then copied out of the
    scan's per-chunk tensors, so carrying them keeps nothing else of the run alive. ``chunk_size``: the scan's chunk
    for each run (:func:`evaluation_chunk`: a number, "auto", or None for the model's; set like ``states_every``).
    It changes the speed, not the results beyond float rounding."""
    device = torch.device(device) if device is not None else _model_device(model)
    chunk_size = evaluation_chunk(model, chunk_size, device)
    mixers = model.mixers if states_every or chunk_size else ()
    model_chunks = [m.chunk_size for m in mixers]
    state, start = None, 0
    with torch.no_grad(), precision_context(device, dtype):
        for end in ends:
            ids = input_ids[:, start:end].to(device)
            rec = [] if record else None
            try:
                for m in mixers:
                    m.states_every = states_every
                    m.chunk_size = chunk_size or m.chunk_size
                if logits:
                    out, state = model(ids, state=state, record=rec)
                else:
                    _, state = model.hidden_states(ids, state=state, record=rec)
                    out = None
            finally:
                for m, chunk in zip(mixers, model_chunks):
                    m.states_every, m.chunk_size = None, chunk
            if states_every:
                state = [s._replace(conv=_owned(s.conv), ssm=_owned(s.ssm)) for s in state]
            yield start, end, out, state, rec
            start = end


AUTO_CHUNK = "auto"


def evaluation_chunk(model: torch.nn.Module, chunk_size: int | str | None, device: torch.device) -> int | None:
    """The scan's chunk for an evaluation run: ``chunk_size`` itself, None for the model's, or for ``"auto"`` on CUDA
    256 when the state is large (d_state >= 512) and 128 otherwise, the model's on a CPU. Speed only. What "auto"
    rests on (H100, a 4 x 256 model of headdim 32, 32 rows of 32K tokens in pieces of 2,048, fp32; chunk 128 and 256
    against 64, ``benchmarks/first_evaluation.py --variants``): d_state 128 1.04x / 0.78x, 256 1.10x / 0.96x,
    512 1.14x / 1.27x, 1024 1.18x / 1.26x, 2048 1.26x / 1.37x. Larger chunks write and pass fewer chunk states
    (most of the work at a large state) and cost more within each chunk."""
    if chunk_size == AUTO_CHUNK:
        if device.type != "cuda":
            return None
        return 256 if max(m.d_state for m in model.mixers) >= 512 else 128
    if problem := chunk_size_problem(chunk_size):
        raise ValueError(problem)
    return chunk_size


def chunk_size_problem(chunk_size) -> str | None:
    """Why ``chunk_size`` is no evaluation chunk (None when it is one)."""
    if chunk_size in (None, AUTO_CHUNK) or (type(chunk_size) is int and chunk_size >= 1):
        return None
    return (f"chunk_size must be a whole number >= 1, {AUTO_CHUNK!r}, or None (null in a config) for the model's "
            f"(got {chunk_size!r})")


def _owned(t: Tensor) -> Tensor:
    """``t``, copied when it is a view into a larger tensor (a final state sliced out of all the chunks' states)."""
    return t if t._base is None else t.clone()


# Bytes one segment of the one-pass state sampling may take (see ``segment_bytes``): its sampled SSM states of
# every layer, held until the caller has read its pieces, and one layer's scan. A long row runs in as many segments
# as this needs, so the memory does not grow with the length.
STATE_SAMPLES_BUDGET = 512 * 2**20
# At most this many scan chunks per segment, whatever the budget allows: the scan passes the state across the chunks
# of a run with a (chunks + 1)^2 decay matrix, so its work per token grows with the chunks of a run (on CPU, 8 x 16384
# tokens at stride 16 took 1.6x as long at 128 chunks a segment as at 16, and the whole row at once 10x as long).
SEGMENT_MAX_CHUNKS = 32


def scan_chunk(stride: int, chunk_size: int) -> int:
    """The chunk the sampling scan runs in for states every ``stride`` tokens (``ssd.ssd_sampling_states``)."""
    chunk = stride
    while chunk > chunk_size and chunk % 2 == 0:
        chunk //= 2
    return chunk


def segment_bytes(model: torch.nn.Module, rows: int, stride: int, strides: int) -> int:
    """Estimated peak bytes of one one-pass segment of ``strides`` x ``stride`` tokens over ``rows`` rows, counted in
    the scan's dtype (fp32; fp64 for a float64 model) whatever the autocast dtype:

    - the sampled SSM states of every layer: strides x n_layer x rows x nheads x headdim x d_state;
    - one layer's scan on top: 7 tensors of the SSM state at every chunk end (the chunks' own states, with the carried
      one prepended, passed across chunks, the layouts the matmuls copy them to, the samples kept), the chunk-to-chunk
      decay (4 x rows x nheads x (chunks + 1)^2 with segsum's) and per token 4 x the input projection's width and
      3 x nheads x chunk score entries.

    Measured peaks of live tensor bytes (models of 2-4 layers, d_state 16-512, strides 8-512) were 0.7-1.1 x this."""
    mixers = model.mixers
    m = mixers[0]  # every layer has the same shape
    item = torch.promote_types(next(model.parameters()).dtype, torch.float32).itemsize
    state = rows * m.nheads * m.headdim * m.d_state  # one layer's SSM state, all rows
    chunk = scan_chunk(stride, m.chunk_size)
    chunks = strides * (stride // chunk)
    tokens = strides * stride
    width = 2 * m.d_inner + 2 * m.ngroups * m.d_state + m.nheads  # in_proj's output
    floats = (strides * len(mixers) * state + 7 * chunks * state + 4 * rows * m.nheads * (chunks + 1) ** 2
              + rows * tokens * (4 * width + 3 * m.nheads * chunk))
    return floats * item


def segment_strides(model: torch.nn.Module, rows: int, stride: int, n: int, budget: int | None = None) -> int:
    """Strides per one-pass segment: the most whose :func:`segment_bytes` stay within ``budget`` (default
    :data:`STATE_SAMPLES_BUDGET`) and whose scan chunks stay within :data:`SEGMENT_MAX_CHUNKS`, up to the
    ceil(n / stride) of the whole row, and at least one."""
    budget = STATE_SAMPLES_BUDGET if budget is None else budget
    per = stride // scan_chunk(stride, model.mixers[0].chunk_size)  # chunks per stride
    lo, hi = 1, max(1, min(-(-n // stride), SEGMENT_MAX_CHUNKS // per))
    while lo < hi:  # the largest k in [1, hi] with segment_bytes(k) <= budget (1 when none is)
        mid = (lo + hi + 1) // 2
        if segment_bytes(model, rows, stride, mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def segment_ends(n: int, stride: int, extra_ends: tuple[int, ...], strides: int) -> list[int]:
    """Where the one-pass segments of a row of ``n`` tokens end. A segment from s samples its state at s + stride,
    s + 2 stride, ... and at its end, so it holds at most ``strides`` samples and ends early at the first sample
    point (:func:`sample_ends`) off that grid: an extra end that is no multiple of ``stride``, or n. A segment that
    starts off the grid (at such an extra end) runs to the next sample point only."""
    out, s, j = [], 0, 0
    for p in sample_ends(n, stride, extra_ends):
        j += 1
        if p != s + j * stride or j == strides or p == n:
            out.append(p)
            s, j = p, 0
    return out


def iter_state_samples(
    model: torch.nn.Module,
    input_ids: Tensor,
    stride: int,
    dtype: str | torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    extra_ends: tuple[int, ...] = (),
    budget: int | None = None,
) -> Iterator[Piece]:
    """The pieces :func:`iter_pieces` yields with ``record=True, logits=False`` (state after every ``stride`` tokens
    and at ``extra_ends``; per-step dt and A of the piece), computed a segment of many strides at a time when
    possible: the scan keeps its state every ``stride`` tokens (``Mamba2.states_every``) and the state is carried
    from segment to segment (:func:`run_carried`). Segments are as long as ``budget`` bytes allow
    (:func:`segment_strides`), so the memory is bounded for any length. Pieces then carry only the SSM state (conv
    None). Falls back to the piecewise run when a mixer rewrites its carried state or its forward (interventions,
    sliding window)."""
    n = input_ids.size(1)
    mixers = getattr(model, "mixers", None)
    one_pass = (
        stride >= 1 and mixers is not None
        and all(m.state_hook is None and m.forward_override is None for m in mixers)
    )
    if not one_pass:
        yield from iter_pieces(model, input_ids, stride, dtype, device, record=True, extra_ends=extra_ends, logits=False)
        return
    strides = segment_strides(model, input_ids.size(0), stride, n, budget)
    ends = segment_ends(n, stride, extra_ends, strides)
    for s, t, _, state, records in run_carried(model, input_ids, ends, dtype, device, record=True, logits=False,
                                               states_every=stride):
        pieces = deque()
        for k, start in enumerate(range(s, t, stride)):
            end = min(start + stride, t)
            if end < t:  # views into this segment's records, freed once the caller has let go of these pieces
                pieces.append(Piece(start, end, None, [LayerState(None, r["states"][:, k]) for r in records],
                                    [{"dt": r["dt"][:, start - s:end - s], "A": r["A"]} for r in records]))
            else:  # the segment's last: its own tensors, so a caller holding it keeps nothing else of the segment
                pieces.append(Piece(start, end, None, [LayerState(None, c.ssm) for c in state],
                                    [{"dt": r["dt"][:, start - s:].clone(), "A": r["A"]} for r in records]))
        del records  # only the pieces hold this segment's states while the caller reads them
        while pieces:
            yield pieces.popleft()


def token_losses(
    model: torch.nn.Module,
    tokens: Tensor,
    piece_len: int = 2048,
    dtype: str | torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    chunk_size: int | str | None = None,
) -> Tensor:
    """Per-position next-token loss (b, L-1), fp32, on CPU, for rows ``tokens`` (b, L).

    Entry [r, i] is the loss of predicting tokens[r, i+1] from tokens[r, :i+1] (position i+1).
    ``dtype`` float32 is the paper's analysis precision (tf32: its matmuls on TF32 tensor cores); bfloat16 runs
    under autocast. ``batch_size`` rows go through the model at a time (default: all); logits take batch_size x
    piece_len x vocab floats. ``chunk_size``: the scan's chunk (:func:`evaluation_chunk`; default the model's)."""
    if tokens.dim() != 2 or tokens.size(1) < 2:
        raise ValueError(f"tokens must be (batch, length >= 2); got shape {tuple(tokens.shape)}")
    tokens = tokens.long()
    out = torch.empty(tokens.size(0), tokens.size(1) - 1, dtype=torch.float32)
    for r in range(0, tokens.size(0), batch_size or tokens.size(0)):
        rows = tokens[r:r + (batch_size or tokens.size(0))]
        # the losses stay on the model's device until the rows are done: one copy back, not a wait per piece
        losses = None
        for p in iter_pieces(model, rows[:, :-1], piece_len, dtype, device, chunk_size=chunk_size):
            if losses is None:
                losses = torch.empty(rows.size(0), rows.size(1) - 1, dtype=torch.float32, device=p.logits.device)
                targets = rows.to(p.logits.device)
            losses[:, p.start:p.end] = F.cross_entropy(p.logits.float().transpose(1, 2),
                                                       targets[:, p.start + 1:p.end + 1], reduction="none")
        out[r:r + rows.size(0)] = losses.cpu()
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


def read_position_losses_csv(path: str) -> np.ndarray:
    """The losses of :func:`write_position_losses_csv`'s file, position 1 first."""
    return np.loadtxt(path, delimiter=",", skiprows=1, usecols=1, ndmin=1)
