"""Our fused Triton causal conv1d + SiLU (models/kernels/conv_triton.py) against the torch path it replaced and
against the causal-conv1d library's CUDA kernels, on the model's own layout (GPU). The model runs causal_conv1d's
kernels when the library is installed (models/kernels/conv_cc1d.py: the adapter timed here), ours otherwise.

On the GPU node (causal-conv1d 1.7.0 installed, see the README), one run answers issue 17 item 5:

    python benchmarks/conv_kernel.py --all_shapes    # 130m and the study's cells, every case, ratios, exit 1 on FAIL
    python benchmarks/conv_kernel.py                 # 130m only (b 16, l 2048, d_model 768, d_state 128), bf16
    python benchmarks/conv_kernel.py --shape study   # the study's cells only
    python benchmarks/conv_kernel.py --shape cells   # the regime study's large states at LEN 16-32
    python benchmarks/conv_kernel.py --sweep         # also try other Triton tile sizes (every shape chosen)
    python benchmarks/conv_kernel.py --shape cells --sweep   # ... at the study's short rows
    python benchmarks/conv_kernel.py --shape mixed --timer graph --scan   # the time-walking kernels' plans

Shapes: ``130m`` is the 130M model's conv (b 16, l 2048, conv_dim 1792, in_proj row stride 3352); ``study`` is the
forgetting study's cell (d_model 256, headdim 32, expand 2) at d_state 64 and 256 and LEN 32, 64, 512 with
b * l = 16384 tokens per step. u is always laid out as in Mamba2.forward: a column slice of in_proj's output
(b, l, d) with the row stride of the wider tensor, no copy; weight (d, 1, k) and bias fp32 as the parameters are.

Correctness first: each contender runs once in --check_dtype (fp32 by default; --check_dtype bf16 works, tolerance 3e-2)
and its output, new conv state and grads of u, weight and bias are compared with models/conv.py::causal_conv1d (+ SiLU)
run in fp32 on the same values (TF32 off); the error is max |a - ref| / max |ref|. A FAIL (or a contender that
raises) makes the exit status 1; the timings are still printed.

Rows (times in microseconds, triton.testing.do_bench, or with ``--timer graph`` replayed from a CUDA graph: GPU
work only, as a graphed training step sees it, where do_bench also counts a call's launches and autograd
bookkeeping; inputs in --dtype, bf16 by default):

Every contender returns the new conv state, which the mixer hands on. causal_conv1d is
models/kernels/conv_cc1d.py's adapter, as backend.conv1d_silu calls it:

- ``plain`` fwd / fwd+bwd: no seq_idx, no carried state (ordinary training). causal_conv1d is
  ``causal_conv1d_fn(u.transpose(1, 2), w, b, activation="silu")`` as mamba_ssm calls it; its new conv state,
  like ours, is carried_inputs (one small copy).
- ``seq_idx``: packed documents (3 per row), seq_idx (b, l) int32; causal_conv1d as above with ``seq_idx=``.
- ``state``: a carried conv state in and the new one out (state-passing training, no seq_idx). Both contenders get
  the state as the mixer carries it ((b, d, k-1) contiguous, u's dtype) and return the new one; causal_conv1d
  moves it to channel-last (its kernel needs ``initial_states.stride(1) == 1``) and uses ``return_final_states``.
- ``state+seq_idx``: both (state passing over packed documents). causal_conv1d refuses ``return_final_states``
  with ``seq_idx``, so its new state comes from our carried_inputs, as ours does.
- ``decode`` step: one token for batch b, conv state (b, d, k-1). torch = the model's decode step without
  causal_conv1d (conv.conv_step: cat, multiply, sum, SiLU); triton = our training kernel at l = 1 (not used by
  step()); causal_conv1d = ``causal_conv1d_update(x, state, w, b, activation="silu")`` on a copy of the state
  (the library shifts it in place; the model's step leaves the caller's state as it was).
- fwd+bwd = the forward plus ``torch.autograd.grad(out, [u, weight, bias], dy)``.

Columns: ``triton``, ``torch``, ``cc1d`` (causal_conv1d); ``torch/tri`` > 1 means our kernel beats the torch path;
``cc1d/ours`` > 1 means ours (what the model runs without causal_conv1d: Triton for training, the torch ops for
decode) is faster.
The lines after the table say, per case, which to use (causal_conv1d when it is as fast, within 3%, or faster).
Without causal_conv1d its cells say ``not installed``; a shape its kernels refuse (channels or row stride not a
multiple of 8, misaligned u) says ``unsupported``. Without CUDA the script exits with one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_mamba.models.conv import causal_conv1d, conv_step
from lightning_mamba.models.kernels import conv_cc1d
from lightning_mamba.models.kernels.backend import conv_kernel_name
from lightning_mamba.models.kernels.overrides import overridden

CASES = ("plain", "seq_idx", "state", "state+seq_idx")  # the training form; "decode" is the one-token step
TIE = 1.03  # causal_conv1d within 3% of ours counts as "as fast": the issue says to use the library then
TOLERANCE = {torch.float32: 5e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}  # of max |ref|
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NOT_INSTALLED = conv_cc1d.NOT_INSTALLED


# ---- shapes and inputs ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """One Mamba2 mixer's conv: u is the xBC columns of in_proj's output (z, xBC, dt), ngroups 1."""

    name: str
    batch: int
    seq_len: int
    d_model: int
    d_state: int
    headdim: int
    expand: int = 2
    d_conv: int = 4

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def conv_dim(self) -> int:  # x, B, C
        return self.d_inner + 2 * self.d_state

    @property
    def width(self) -> int:  # in_proj's output: z, xBC, dt (one per head)
        return 2 * self.d_inner + 2 * self.d_state + self.d_inner // self.headdim


def _study(d_state: int, seq_len: int) -> Shape:
    return Shape(f"study ds{d_state} l{seq_len}", 16384 // seq_len, seq_len, 256, d_state, 32)


SHAPES = {
    "130m": [Shape("130m", 16, 2048, 768, 128, 64)],
    "study": [_study(ds, l) for ds in (64, 256) for l in (32, 64, 512)],
    # the regime study's large-state, short-LEN cells (configs/study/regime.yaml), where the conv's backward was
    # most of the step before short rows got their own tiles
    "cells": [_study(ds, l) for ds, l in ((2048, 16), (1024, 32), (512, 32))],
    # the eight mixed cells cell_throughput.py runs together (--states 128,256,512,1024 --lens 32,64)
    "mixed": [_study(ds, l) for ds, l in ((128, 32), (256, 64), (512, 32), (1024, 64))],
}


@dataclass
class Inputs:
    """What the mixer hands the conv: u a strided column slice of ``wide`` (training), x_step one token's slice."""

    shape: Shape
    wide: Tensor  # (b, l, width), requires grad
    u: Tensor  # (b, l, conv_dim) view of wide
    weight: Tensor  # (d, 1, k) fp32, requires grad
    bias: Tensor  # (d,) fp32, requires grad
    seq_idx: Tensor  # (b, l) int32, 3 documents per row
    conv_state: Tensor  # (b, d, k-1) contiguous in u's dtype: what carried_inputs returns
    dy: Tensor  # (b, l, d) upstream gradient
    x_step: Tensor  # (b, d) view of a (b, width) tensor: one decode token
    step_state: Tensor  # (b, d, k-1) in u's dtype


def make_inputs(shape: Shape, device, dtype: torch.dtype, seed: int = 0) -> Inputs:
    """Random inputs in the model's layout; the same seed gives the same values in every dtype (drawn in fp32)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    b, l, d, k = shape.batch, shape.seq_len, shape.conv_dim, shape.d_conv
    cols = slice(shape.d_inner, shape.d_inner + d)

    def randn(*size, dt=dtype):
        return torch.randn(*size, generator=gen, device=device).to(dt)

    wide = randn(b, l, shape.width).requires_grad_()
    seq_idx = torch.zeros(b, l, dtype=torch.int32, device=device)
    seq_idx[:, l // 3:] += 1  # boundaries off any tile edge, so a wrong tap at a boundary shows
    seq_idx[:, 2 * l // 3:] += 1
    step_wide = randn(b, shape.width)
    return Inputs(
        shape=shape, wide=wide, u=wide[:, :, cols],
        weight=(randn(d, 1, k, dt=torch.float32) / math.sqrt(k)).requires_grad_(),
        bias=randn(d, dt=torch.float32).requires_grad_(),
        seq_idx=seq_idx, conv_state=randn(b, d, k - 1), dy=randn(b, l, d),
        x_step=step_wide[:, cols], step_state=randn(b, d, k - 1),
    )


def as_reference(inp: Inputs) -> Inputs:
    """The same values in fp32 (fresh leaves, same layout): what the torch reference is checked on."""
    wide = inp.wide.detach().float().requires_grad_()
    step_wide = inp.x_step.detach().float()
    return dataclasses.replace(
        inp, wide=wide, u=wide[:, :, inp.shape.d_inner:inp.shape.d_inner + inp.shape.conv_dim],
        weight=inp.weight.detach().float().requires_grad_(), bias=inp.bias.detach().float().requires_grad_(),
        conv_state=inp.conv_state.float(), dy=inp.dy.float(), x_step=step_wide, step_state=inp.step_state.float(),
    )


def case_args(inp: Inputs, case: str) -> tuple[Tensor | None, Tensor | None]:
    """(conv_state, seq_idx) for a training case."""
    state = inp.conv_state if case.startswith("state") else None
    return state, inp.seq_idx if "seq_idx" in case else None


# ---- contenders: (u, weight, bias, conv_state, seq_idx) -> (silu(conv) (b, l, d), new state or None) --------------
def torch_conv(u, weight, bias, conv_state, seq_idx):
    """The reference: models/conv.py (backend.conv1d_silu's torch path)."""
    out, state = causal_conv1d(u, weight, bias, conv_state, seq_idx)
    return F.silu(out), state


def triton_conv(u, weight, bias, conv_state, seq_idx):
    from lightning_mamba.models.kernels.conv_triton import causal_conv1d_silu

    return causal_conv1d_silu(u, weight, bias, conv_state, seq_idx)


def tiles_only():
    """Our conv with its tile kernels at every row length (none walking time: conv_scan_triton.py), inside a block
    or a function it decorates: for the sections that study the tiles."""
    from lightning_mamba.models.kernels import conv_triton as ct

    return overridden(ct, "SCAN_LENS", range(0))


# ---- decode: (x (b, d), conv_state (b, d, k-1), weight, bias) -> (silu(conv) (b, d), new state) ------------------
def torch_step(x, conv_state, weight, bias):
    """The model's decode step without causal_conv1d (backend.conv1d_silu_step's torch path)."""
    out, state = conv_step(x, conv_state, weight, bias)
    return F.silu(out), state


def reference_step(x, conv_state, weight, bias):
    """models/conv.py on a one-token sequence: what the check holds every decode contender to."""
    out, state = torch_conv(x[:, None], weight, bias, conv_state, None)
    return out[:, 0], state


def triton_step(x, conv_state, weight, bias):
    out, state = triton_conv(x[:, None], weight, bias, conv_state, None)
    return out[:, 0], state


def contenders(device, lib, lib_why: str) -> dict[str, tuple[Callable | str, Callable | str]]:
    """name -> (training fn or why it is missing, decode fn or why)."""
    from lightning_mamba.models.kernels import conv_triton

    triton_why = "" if conv_triton.available() and torch.device(device).type == "cuda" else "n/a (needs triton + CUDA)"
    cc1d = (lib_why, lib_why)
    if lib is not None:  # the model's adapter (models/kernels/conv_cc1d.py) on this library
        cc1d = (functools.partial(conv_cc1d.conv1d_silu, lib=lib), functools.partial(conv_cc1d.conv1d_silu_step, lib=lib))
    return {
        "triton": (triton_why or triton_conv, triton_why or triton_step),
        "torch": (torch_conv, torch_step),
        "cc1d": cc1d,
    }


# ---- correctness ------------------------------------------------------------------------------------------------
def _rel_err(a: Tensor | None, ref: Tensor) -> float:
    if a is None:
        return math.inf
    ref = ref.detach().double()
    return ((a.detach().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def _run_training(fn, inp: Inputs, case: str) -> dict[str, Tensor | None]:
    state, seq = case_args(inp, case)
    out, new_state = fn(inp.u, inp.weight, inp.bias, state, seq)
    du, dw, db = torch.autograd.grad(out, [inp.u, inp.weight, inp.bias], inp.dy)
    return {"out": out, "state": new_state, "du": du, "dw": dw, "db": db}


def check_training(fn, inp: Inputs, case: str) -> tuple[bool, str]:
    """(ok, worst error) of fn on inp against torch_conv in fp32; a state is checked where fn returns one."""
    got = _run_training(fn, inp, case)
    with _no_tf32():
        want = _run_training(torch_conv, as_reference(inp), case)
    errs = {k: _rel_err(v, want[k]) for k, v in got.items() if v is not None or k != "state"}
    return _verdict(errs, inp.u.dtype)


def check_step(fn, inp: Inputs) -> tuple[bool, str]:
    """(ok, worst error) of a decode fn against reference_step in fp32 (on a copy of the state: fn may update it)."""
    with torch.no_grad():
        out, state = fn(inp.x_step, inp.step_state.clone(), inp.weight, inp.bias)
        ref = as_reference(inp)
        want_out, want_state = reference_step(ref.x_step, ref.step_state, ref.weight, ref.bias)
    return _verdict({"out": _rel_err(out, want_out), "state": _rel_err(state, want_state)}, inp.x_step.dtype)


def _verdict(errs: dict[str, float], dtype) -> tuple[bool, str]:
    worst = max(errs, key=errs.get)
    ok = errs[worst] <= TOLERANCE[dtype]
    return ok, f"{'ok' if ok else 'FAIL'} ({worst} {errs[worst]:.1e})"


class _no_tf32:
    """TF32 off for the fp32 reference (cuDNN's conv may use it by default: 1e-3 errors that are not the kernel's)."""

    def __enter__(self):
        self.saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


def safely(fn, *args) -> tuple[bool, str]:
    """A check that raises is a FAIL with its message, so one bad contender does not end the run."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - reported, and the exit status says so
        return False, f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:80]}"


# ---- timing -----------------------------------------------------------------------------------------------------
def cuda_timer(fn) -> float:
    """Milliseconds per call (triton.testing.do_bench: median, L2 flushed between calls)."""
    from triton.testing import do_bench

    return do_bench(fn)


def graph_timer(fn, reps: int = 50) -> float:
    """Milliseconds per call of ``fn`` replayed from one CUDA graph (GPU work only: a call's launches and autograd
    bookkeeping, as large as its GPU time at these sizes, made do_bench's figures wander up to 2x between plans)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # thread_local: only this thread's CUDA calls are checked while capturing, not those of autograd's worker thread,
    # which runs the backward (cell_throughput.py captures so too). Captured on the warm-up's stream: the libraries'
    # per-stream set-up (cuBLAS, cuDNN handles) happened there, not during the capture (the first capture of a run on
    # torch's own capture stream failed: "would make the legacy stream depend on a capturing blocking stream").
    with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        fn()
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def wall_timer(fn, reps: int = 2) -> float:
    """Milliseconds per call by the wall clock: the CPU smoke test's stand-in for do_bench."""
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


TIMERS = {"bench": cuda_timer, "graph": graph_timer}


def time_training(timer, fn, inp: Inputs, case: str) -> tuple[float, float]:
    """(fwd, fwd+bwd) in milliseconds."""
    state, seq = case_args(inp, case)
    params = [inp.u, inp.weight, inp.bias]
    fwd = timer(lambda: fn(inp.u, inp.weight, inp.bias, state, seq))
    both = timer(lambda: torch.autograd.grad(fn(inp.u, inp.weight, inp.bias, state, seq)[0], params, inp.dy))
    return fwd, both


def uncapturable(err: RuntimeError) -> str:
    """Why a timing raised (e.g. a kernel a CUDA graph cannot capture), in one line: the run goes on without it."""
    return f"not timed: {str(err).splitlines()[0]}"


def time_step(timer, fn, inp: Inputs) -> float:
    state = inp.step_state.clone()  # causal_conv1d_update shifts it in place, call after call: harmless for timing
    with torch.no_grad():
        return timer(lambda: fn(inp.x_step, state, inp.weight, inp.bias))


# ---- the run ----------------------------------------------------------------------------------------------------
@dataclass
class Row:
    shape: str
    case: str
    mode: str  # fwd, fwd+bwd, step
    ours: str  # the contender the model uses here without causal_conv1d: triton (training) or torch (decode)
    us: dict[str, float | str]  # contender -> microseconds, or why there is no time
    checks: dict[str, str]


def for_layout(fns: dict, inp: Inputs) -> dict:
    """fns with causal_conv1d's training fn replaced by why, where its kernels refuse this layout (not a FAIL)."""
    train_fn, step_fn = fns["cc1d"]
    why = callable(train_fn) and conv_cc1d.unsupported(inp.u, inp.weight)
    return {**fns, "cc1d": (why, step_fn)} if why else fns


def run(shapes: list[Shape], device, dtype, check_dtype, timer, lib=None) -> int:
    """Check, time and print every (shape, case); returns the exit status (1 if any check failed)."""
    all_fns = contenders(device, lib, NOT_INSTALLED)
    rows: list[Row] = []
    failed = False
    for shape in shapes:
        # correctness first, in check_dtype, then drop those tensors before timing in dtype
        chk = make_inputs(shape, device, check_dtype)
        fns = for_layout(all_fns, chk)
        checks = {}
        for name, (train_fn, step_fn) in fns.items():
            for case in CASES:
                checks[name, case] = safely(check_training, train_fn, chk, case) if callable(train_fn) else None
            checks[name, "decode"] = safely(check_step, step_fn, chk) if callable(step_fn) else None
        failed |= any(c is not None and not c[0] for c in checks.values())
        del chk
        inp = make_inputs(shape, device, dtype)
        fns = for_layout(fns, inp)  # u's alignment depends on the dtype
        for case in CASES + ("decode",):
            modes = ("step",) if case == "decode" else ("fwd", "fwd+bwd")
            us = {m: {} for m in modes}
            for name, (train_fn, step_fn) in fns.items():
                fn, check = (step_fn if case == "decode" else train_fn), checks[name, case]
                for m in modes:
                    us[m][name] = fn if not callable(fn) else "FAIL" if not check[0] else None
                if callable(fn) and check[0]:  # only what computed the right thing is timed
                    try:
                        t = (time_step(timer, fn, inp),) if case == "decode" else time_training(timer, fn, inp, case)
                    except RuntimeError as err:
                        print(f"# {shape.name} {case} {name}: {uncapturable(err)}")
                        t = ("untimed",) * len(modes)
                    for m, ms in zip(modes, t):
                        us[m][name] = ms * 1e3 if isinstance(ms, float) else ms
            for m in modes:
                rows.append(Row(shape.name, case, m, "torch" if case == "decode" else "triton", us[m],
                                {n: _check_text(checks[n, case], fns[n][case == "decode"]) for n in fns}))
        del inp
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows)
    print_verdicts(rows)
    return 1 if failed else 0


SHORT = {NOT_INSTALLED: "not inst.", "n/a": "n/a", "unsupported": "unsupp.", "FAIL": "FAIL", "untimed": "untimed"}


def _check_text(check: tuple[bool, str] | None, fn) -> str:
    if check is not None:
        return check[1]
    return f"causal_conv1d {fn}" if fn == NOT_INSTALLED else str(fn)


def _cell(v) -> str:
    """Microseconds, or a short word for why not (the check column has the whole reason)."""
    if isinstance(v, float):
        return f"{v:9.1f}"
    return f"{next((w for k, w in SHORT.items() if str(v).startswith(k)), str(v)[:9]):>9}"


def _ratio(a, b) -> float | None:
    return a / b if isinstance(a, float) and isinstance(b, float) and b > 0 else None


def print_table(rows: list[Row]) -> None:
    print(f"{'shape':<18} {'case':<14} {'mode':<8} {'triton':>9} {'torch':>9} {'cc1d':>9} {'torch/tri':>9} "
          f"{'cc1d/ours':>9}  check (triton | torch | cc1d)")
    for r in rows:
        t_over_tri = _ratio(r.us["torch"], r.us["triton"])
        cc_over_ours = _ratio(r.us["cc1d"], r.us[r.ours])
        fmt = lambda x: f"{x:9.2f}" if x is not None else f"{'-':>9}"  # noqa: E731
        print(f"{r.shape:<18} {r.case:<14} {r.mode:<8} {_cell(r.us['triton'])} {_cell(r.us['torch'])} "
              f"{_cell(r.us['cc1d'])} {fmt(t_over_tri)} {fmt(cc_over_ours)}  "
              f"{r.checks['triton']} | {r.checks['torch']} | {r.checks['cc1d']}")


def verdicts(rows: list[Row]) -> list[str]:
    """One line per (case, mode): which to use on which shapes, from cc1d/ours (ours faster when > TIE)."""
    lines = []
    for key in dict.fromkeys((r.case, r.mode) for r in rows):
        lib_wins, ours_wins = [], []
        for r in (r for r in rows if (r.case, r.mode) == key):
            ratio = _ratio(r.us["cc1d"], r.us[r.ours])
            if ratio is not None:
                (ours_wins if ratio > TIE else lib_wins).append(f"{r.shape} {ratio:.2f}x")
        ours = "torch step" if key[0] == "decode" else "ours (Triton)"
        if not lib_wins and not ours_wins:
            lines.append(f"{key[0]} {key[1]}: {ours} (no causal_conv1d time to compare)")
        elif not lib_wins:
            lines.append(f"{key[0]} {key[1]}: {ours} everywhere (cc1d/ours: {', '.join(ours_wins)})")
        elif not ours_wins:
            lines.append(f"{key[0]} {key[1]}: causal_conv1d everywhere (cc1d/ours: {', '.join(lib_wins)})")
        else:
            lines.append(f"{key[0]} {key[1]}: causal_conv1d on {', '.join(lib_wins)}; {ours} on {', '.join(ours_wins)}")
    return lines


def print_verdicts(rows: list[Row]) -> None:
    print("which to use where (cc1d/ours > 1: ours faster; causal_conv1d when within 3% or faster):")
    for line in verdicts(rows):
        print("  " + line)


def print_backward_alone(inp: Inputs) -> None:
    """Our Triton backward kernel alone (conv_triton._backward), as the earlier version of this script printed."""
    from triton.testing import do_bench

    from lightning_mamba.models.kernels import conv_triton as ct

    parts = []
    for case in ("plain", "seq_idx"):
        state, seq = case_args(inp, case)
        with torch.no_grad():
            ms = do_bench(lambda: ct._backward(inp.dy, inp.u, inp.weight, inp.bias, state, seq))
        parts.append(f"{case} {ms * 1e3:.1f} us")
    print(f"triton backward alone ({inp.shape.name}): " + ", ".join(parts))


@tiles_only()
def print_short_row_tiles(inp: Inputs) -> None:
    """Our kernels with the tile plan they run (conv_triton.time_tiles) against the long-row plan they ran before
    (the tuned tiles, one batch row per program, whatever the row's length), same process, plain case."""
    from lightning_mamba.models.kernels import conv_triton as ct

    ours = ct.time_tiles
    now = time_training(cuda_timer, triton_conv, inp, "plain")
    try:
        ct.time_tiles = lambda l, block_l, blocks: (block_l, blocks, 1)  # noqa: E731
        before = time_training(cuda_timer, triton_conv, inp, "plain")
    finally:
        ct.time_tiles = ours
    plan = ", ".join(f"{what} {ours(inp.shape.seq_len, bl, bs)}" for what, bl, bs in
                     (("fwd", ct.FWD_BLOCK_L, 1), ("bwd", ct.BWD_BLOCK_L, ct.backward_plan(inp.shape.seq_len)[2])))
    print(f"short-row tiles ({inp.shape.name}; tile, tiles, rows per program: {plan}): fwd {now[0] * 1e3:.0f} us "
          f"vs {before[0] * 1e3:.0f} us with long-row tiles ({before[0] / now[0]:.2f}x), fwd+bwd {now[1] * 1e3:.0f} "
          f"vs {before[1] * 1e3:.0f} us ({before[1] / now[1]:.2f}x)")


@tiles_only()
def print_gathered_rows(inp: Inputs, check_dtype, device="cuda", timer=cuda_timer) -> bool:
    """The backward that gathers g along a row that fits one tile (conv_triton.GATHER_MAX_LEN: the default for rows
    of up to 16) against the one that recomputes it at every lag, same process: first its check in ``check_dtype``
    on every training case, then the plain case's fwd+bwd both ways. Returns whether every check passed."""
    from lightning_mamba.models.kernels import conv_triton as ct

    before = ct.GATHER_MAX_LEN
    checks = {}
    try:
        ct.GATHER_MAX_LEN = 1 << 30
        ref_inp = make_inputs(inp.shape, device, check_dtype)
        for case in CASES:
            checks[case] = safely(check_training, triton_conv, ref_inp, case)
        ok = all(c[0] for c in checks.values())
        if ok:  # a kernel that fails its check is not timed
            gathered = time_training(timer, triton_conv, inp, "plain")
            ct.GATHER_MAX_LEN = 0
            recomputed = time_training(timer, triton_conv, inp, "plain")
    finally:
        ct.GATHER_MAX_LEN = before
    timing = (f"fwd+bwd {gathered[1] * 1e3:.0f} us vs {recomputed[1] * 1e3:.0f} us recomputed "
              f"({recomputed[1] / gathered[1]:.2f}x)" if ok else "not timed")
    print(f"whole rows gathered ({inp.shape.name}): check {'; '.join(f'{k} {v[1]}' for k, v in checks.items())}; "
          + timing)
    return ok


# (BWD_BLOCK_L, BWD_BLOCK_D, BWD_WARPS, BWD_BLOCKS) plans --sweep times (for rows that fit one tile the last three
# stand for conv_triton.ONE_TILE_BWD); the first is the long-row default, (32, 32, 2, 2) the one-tile one. On short rows
# time_tiles turns BLOCK_L x BLOCKS into the rows a program takes (LEN 32: 128 / 32 = 4), so the last ones vary that
# (one or two rows per program: more programs, less serial work each) and the channel tile and warps. The last three
# make rows of 33-64 one tile too (gathered and not): the one-tile plan's A/B at LEN 64.
BWD_SWEEP = [(32, 64, 4, 4), (32, 64, 4, 8), (64, 64, 8, 2), (32, 128, 8, 4), (16, 128, 4, 8),
             (32, 64, 4, 1), (32, 64, 4, 2), (32, 32, 2, 2), (32, 32, 4, 1), (32, 128, 4, 1), (32, 64, 8, 2),
             (64, 32, 2, 1), (64, 32, 4, 1), (64, 64, 4, 1)]


@tiles_only()
def sweep(inp: Inputs, check_dtype=torch.float32, device="cuda", timer=cuda_timer, plans=None) -> bool:
    """Other tile sizes of our kernels for one shape, plain case: the forward's, then each backward plan (``plans``,
    default BWD_SWEEP) checked in ``check_dtype`` on every training case and, if it passes, its forward + backward
    timed by ``timer`` (main passes graph_timer: GPU time only), then the fastest. The module's tiles are put back.
    Returns whether every plan passed its check."""
    from lightning_mamba.models.kernels import conv_triton as ct

    def fwd():
        return triton_conv(inp.u, inp.weight, inp.bias, None, None)

    name, ok, best = inp.shape.name, True, None
    fwd_base = ct.FWD_BLOCK_L, ct.FWD_BLOCK_D, ct.FWD_WARPS
    bwd_base = ct.BWD_BLOCK_L, ct.BWD_BLOCK_D, ct.BWD_WARPS, ct.BWD_BLOCKS
    one_tile_base, gather_base = ct.ONE_TILE_BWD, ct.GATHER_MAX_LEN
    default = (ct.BWD_BLOCK_L, *ct.backward_plan(inp.shape.seq_len))  # the plan these rows take
    try:
        for cfg in [(64, 128, 8), (32, 128, 4), (32, 64, 4), (128, 64, 8)]:
            ct.FWD_BLOCK_L, ct.FWD_BLOCK_D, ct.FWD_WARPS = cfg
            print(f"{name}: fwd tiles {cfg}: {timer(fwd) * 1e3:.0f} us")
        ct.FWD_BLOCK_L, ct.FWD_BLOCK_D, ct.FWD_WARPS = fwd_base
        ref_inp = make_inputs(inp.shape, device, check_dtype)
        for cfg in plans or BWD_SWEEP:
            ct.BWD_BLOCK_L, ct.BWD_BLOCK_D, ct.BWD_WARPS, ct.BWD_BLOCKS = cfg
            ct.ONE_TILE_BWD = cfg[1:]  # rows that fit one tile take the plan too
            plan = ct.time_tiles(inp.shape.seq_len, cfg[0], cfg[3])
            # a row in one tile: also with g gathered along it (GATHER_MAX_LEN) rather than recomputed at each lag
            for gather in (False, True) if plan[1] == 1 and inp.shape.seq_len <= plan[0] else (False,):
                ct.GATHER_MAX_LEN = 1 << 30 if gather else 0
                checks = [safely(check_training, triton_conv, ref_inp, case) for case in CASES]
                if all(c[0] for c in checks):
                    try:
                        fwd_ms, both_ms = time_training(timer, triton_conv, inp, "plain")
                        us = f"fwd+bwd {both_ms * 1e3:.0f} us, bwd {(both_ms - fwd_ms) * 1e3:.0f} us"
                        best = min(best or (both_ms, cfg, gather), (both_ms, cfg, gather))
                    except RuntimeError as err:
                        us = uncapturable(err)
                else:
                    ok, us = False, "FAIL " + "; ".join(c[1] for c in checks if not c[0])
                is_default = cfg == default and gather == (inp.shape.seq_len <= gather_base)
                mark = (" gathered" if gather else "") + (" (default)" if is_default else "")
                print(f"{name}: bwd tiles {cfg} (tile, tiles, rows per program {plan}){mark}: {us}")
        if best is not None:
            print(f"{name}: fastest fwd+bwd {best[0] * 1e3:.0f} us at bwd tiles {best[1]}"
                  + (" gathered" if best[2] else ""))
    finally:
        ct.FWD_BLOCK_L, ct.FWD_BLOCK_D, ct.FWD_WARPS = fwd_base
        ct.BWD_BLOCK_L, ct.BWD_BLOCK_D, ct.BWD_WARPS, ct.BWD_BLOCKS = bwd_base
        ct.ONE_TILE_BWD, ct.GATHER_MAX_LEN = one_tile_base, gather_base
    return ok


# (BLOCK_D, ROWS, warps, unroll) plans of the time-walking kernels (conv_scan_triton.py) --scan times, forward and
# backward alike, after the module's own (scan_plans)
SCAN_SWEEP = [(128, 4, 4, 4), (128, 4, 4, 1), (128, 4, 4, 8), (64, 4, 2, 4), (128, 2, 2, 4), (256, 2, 8, 4)]


def scan_plans() -> list[tuple[int, int, int, int]]:
    """The module's backward plan first (checked on every case), then SCAN_SWEEP's others."""
    from lightning_mamba.models.kernels import conv_scan_triton as cs

    return [cs.BWD_PLAN, *(plan for plan in SCAN_SWEEP if plan != cs.BWD_PLAN)]


def scan_sweep(inp: Inputs, check_dtype=torch.float32, device="cuda", timer=cuda_timer, lib=None,
               plans=None) -> bool:
    """The time-walking kernels (at every row length) under each plan (``plans``, default scan_plans())
    against our tile kernels and causal_conv1d (the model's adapter, when installed and the layout suits it), same
    process. The first plan is checked in ``check_dtype`` on every training case, the others on state+seq_idx (the
    same code, other tiles); a plan that passes is timed (plain fwd and fwd+bwd; seq_idx fwd+bwd for the first).
    The module's settings are put back. Returns whether every check passed."""
    from lightning_mamba.models.kernels import conv_scan_triton as cs, conv_triton as ct

    name, ok, best = inp.shape.name, True, None
    baselines = {"tiles": triton_conv}
    if lib is not None and not conv_cc1d.unsupported(inp.u, inp.weight):
        baselines["cc1d"] = functools.partial(conv_cc1d.conv1d_silu, lib=lib)
    base = {}
    for label, fn in baselines.items():
        try:
            with tiles_only():
                base[label] = time_training(timer, fn, inp, "plain")
                seq_both = time_training(timer, fn, inp, "seq_idx")[1]
        except RuntimeError as err:
            print(f"{name}: {label}: {uncapturable(err)}")
            base.pop(label, None)
            continue
        print(f"{name}: {label}: plain fwd {base[label][0] * 1e3:.0f} us, fwd+bwd {base[label][1] * 1e3:.0f} us; "
              f"seq_idx fwd+bwd {seq_both * 1e3:.0f} us")
    ref_inp = make_inputs(inp.shape, device, check_dtype)
    with overridden(ct, "SCAN_LENS", range(1, 1 << 30)):  # every row walks time
        for i, plan in enumerate(plans or scan_plans()):
            with overridden(cs, "FWD_PLAN", plan), overridden(cs, "BWD_PLAN", plan):
                checks = [safely(check_training, triton_conv, ref_inp, case) for case in (CASES if i == 0 else
                                                                                          ("state+seq_idx",))]
                if not all(c[0] for c in checks):
                    ok = False
                    print(f"{name}: scan {plan}: FAIL " + "; ".join(c[1] for c in checks if not c[0]))
                    continue
                try:
                    fwd_ms, both_ms = time_training(timer, triton_conv, inp, "plain")
                except RuntimeError as err:
                    print(f"{name}: scan {plan}: {uncapturable(err)}")
                    continue
                vs = ", ".join(f"{base[k][1] / both_ms:.2f}x {k}" for k in base)
                seq = (f"; seq_idx fwd+bwd {time_training(timer, triton_conv, inp, 'seq_idx')[1] * 1e3:.0f} us"
                       if i == 0 else "")
                print(f"{name}: scan {plan} (times a program {cs.time_chunk(inp.shape.seq_len)}): plain fwd "
                      f"{fwd_ms * 1e3:.0f} us, fwd+bwd {both_ms * 1e3:.0f} us ({vs}){seq}")
                best = min(best or (both_ms, plan), (both_ms, plan))
    if best is not None:
        vs = ", ".join(f"{base[k][1] / best[0]:.2f}x {k}" for k in base)
        print(f"{name}: fastest scan plan {best[1]}: fwd+bwd {best[0] * 1e3:.0f} us ({vs})")
    return ok


def load_causal_conv1d():
    """(the causal_conv1d module or None, its version or NOT_INSTALLED); says why an installed one is not used."""
    lib, why = conv_cc1d.load()
    if lib is None:
        if why != NOT_INSTALLED:
            print(f"# {why}")
        return None, NOT_INSTALLED
    return lib, getattr(lib, "__version__", "?")


def select_shapes(args) -> list[Shape]:
    shapes = [s for group in SHAPES.values() for s in group] if args.all_shapes else SHAPES[args.shape]
    overrides = {k: v for k, v in (("batch", args.batch), ("seq_len", args.seq_len), ("d_model", args.d_model),
                                   ("d_state", args.d_state), ("headdim", args.headdim)) if v is not None}
    if overrides:
        shapes = [dataclasses.replace(s, name=s.name + "*", **overrides) for s in shapes]
    return shapes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--shape", choices=sorted(SHAPES), default="130m")
    p.add_argument("--all_shapes", action="store_true", help="every shape of every --shape choice")
    for name in ("batch", "seq_len", "d_model", "d_state", "headdim"):
        p.add_argument(f"--{name}", type=int, default=None, help="override this field of every selected shape")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="what the timings run in")
    p.add_argument("--check_dtype", choices=sorted(DTYPES), default="fp32", help="what the correctness check runs in")
    p.add_argument("--sweep", action="store_true", help="also time other Triton tile sizes (every shape chosen)")
    p.add_argument("--scan", action="store_true", help="only the time-walking kernels' plans (conv_scan_triton.py) "
                   "against our tile kernels and causal_conv1d, every shape chosen (no table)")
    p.add_argument("--timer", choices=sorted(TIMERS), default="bench",
                   help="the table's timer: bench (triton's do_bench) or graph (CUDA graph replays, GPU time only)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("conv_kernel.py times CUDA kernels: run it on a machine with a GPU")
    shapes = select_shapes(args)
    lib, lib_why = load_causal_conv1d()

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, timings in {args.dtype} ({args.timer} "
          f"timer), checks in {args.check_dtype}, causal_conv1d {lib_why}; times in us; the model's conv kernel: "
          f"{conv_kernel_name('auto', 'cuda')}")
    for s in shapes:
        print(f"# {s.name}: b {s.batch}, l {s.seq_len}, d {s.conv_dim} (row stride {s.width}), k {s.d_conv}")
    if args.scan:
        print("# scan: the time-walking kernels' plans (BLOCK_D, ROWS, warps, unroll), forward and backward alike")
        ok = all([scan_sweep(make_inputs(s, "cuda", DTYPES[args.dtype]), DTYPES[args.check_dtype],
                             timer=TIMERS[args.timer], lib=lib) for s in shapes])
        return 0 if ok else 1
    status = run(shapes, "cuda", DTYPES[args.dtype], DTYPES[args.check_dtype], TIMERS[args.timer], lib)
    from lightning_mamba.models.kernels import conv_triton

    if conv_triton.available():
        timer = TIMERS[args.timer]
        for s in shapes:
            print_backward_alone(make_inputs(s, "cuda", DTYPES[args.dtype]))
        for s in shapes:
            if s.seq_len < conv_triton.BWD_BLOCK_L * conv_triton.BWD_BLOCKS:  # short rows: their own tiles
                print_short_row_tiles(make_inputs(s, "cuda", DTYPES[args.dtype]))
            if s.seq_len <= conv_triton.BWD_BLOCK_L:  # a row in one backward tile: g gathered, or recomputed
                if not print_gathered_rows(make_inputs(s, "cuda", DTYPES[args.dtype]), DTYPES[args.check_dtype],
                                           timer=timer):
                    status = 1
        if args.sweep:
            print("# sweep: each plan timed from a CUDA graph (GPU time only, no launch or autograd overhead)")
            for s in shapes:
                if not sweep(make_inputs(s, "cuda", DTYPES[args.dtype]), DTYPES[args.check_dtype], timer=graph_timer):
                    status = 1
    if status:
        print("FAIL: a contender disagrees with the torch reference (see the check column)")
    return status


if __name__ == "__main__":
    sys.exit(main())
