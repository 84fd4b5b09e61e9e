"""Our fused attention-form SSD kernels (models/kernels/ssd_quadratic_triton.py, what the study's short rows run on
the GPU) against the torch form they replaced (models/ssd.py's ssd_quadratic), same process, forward and forward +
backward, at the study's cells; ``--sweep``: ours under other launch plans (warps, pipelining stages, d_state
columns per step of the C B^T and grad B, C products), to choose the module's settings by measurement; ``--sweep
scores``: ours with C B^T kept from the forward for the backward and made again there (KEEP_SCORES_FROM_N).

    python benchmarks/attention_form_kernel.py                          # GPU: cells 16/32, 64/64, 128/64, bf16
    python benchmarks/attention_form_kernel.py --cells 64/64,512/32 --sweep
    python benchmarks/attention_form_kernel.py --cells 512/128,1024/256 --sweep     # the blocked kernels' warps
    python benchmarks/attention_form_kernel.py --cells 256/32,1024/64 --sweep scores  # C B^T kept or made again
    TRITON_INTERPRET=1 python benchmarks/attention_form_kernel.py --device cpu --cells 16/16 --tokens 64   # smoke

A cell ``d_state/LEN`` is the study's 4 x 256 model's mixer (16 heads of 32, one group) at --tokens tokens a step
(batch = tokens / LEN rows). The inputs are laid out as the mixer hands them over: x, B and C column slices of the
conv's output (b, l, 512 + 2 d_state), the raw dt a column slice of a wider tensor with dt_bias beside it (the
kernels take the softplus), in --dtype. Contenders: ``torch form`` (positive_dt, then ssd_quadratic plus the D skip;
under bf16 autocast on CUDA, as the model runs it), ``ours`` (the module's settings) and ``blocked kernels`` (ssd_blocked_triton.py, what rows
of 65-1024 tokens run: programs per row, head and 64-token block, the scores kept in memory; dt made positive in
torch first). ``--sweep`` adds every plan of SWEEP. Past the one-tile kernels' rows (LEN 65-1024) only the torch form
and the blocked kernels run, and ``--sweep`` times the blocked kernels at the warps of BLOCKED_SWEEP; ``x ours`` is
then over the blocked kernels' default.

Correctness first: every contender runs once in fp32 at up to 8 rows of the cell and its y and gradients (x, the raw
dt, A, B, C, D, dt_bias) are compared with the torch form's in fp32 (max |a - ref| / max |ref|; FAIL above 1e-4, or
a contender that raises; either sets exit status 1). Times: microseconds of GPU work, replayed from a CUDA graph
(conv_kernel.graph_timer; on the CPU the wall clock), the backward as fwd+bwd - fwd. ``x torch`` is the torch form's
fwd+bwd over the contender's, ``x ours`` the default plan's over the contender's (> 1: faster). Graphed, the figures
do not depend on the host CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conv_kernel import _rel_err, graph_timer, wall_timer  # noqa: E402

from lightning_mamba.models.kernels import (
    ssd_blocked_triton as blocks,  # noqa: E402
    ssd_quadratic_triton as q,  # noqa: E402
)
from lightning_mamba.models.kernels.overrides import overridden  # noqa: E402
from lightning_mamba.models.ssd import positive_dt, ssd_quadratic  # noqa: E402

D_INNER, HEADDIM = 512, 32  # the study's 4 x 256 model: expand 2, 16 heads of 32, one group
TOLERANCE = 1e-4
CHECK_ROWS = 8


@dataclass(frozen=True)
class Plan:
    """A launch plan of our kernels: warps, pipelining stages, d_state columns per product step (BLOCK_N), a cap on
    registers per thread (MAXNREG), C B^T kept from the forward or made again (None: the module's own choice)."""

    warps: int | None = None
    stages: int | None = None
    block_n: int | None = None
    maxnreg: int | None = None
    keep_scores: bool | None = None

    def label(self) -> str:
        scores = "-" if self.keep_scores is None else "kept" if self.keep_scores else "made"
        return " ".join(f"{v if v is not None else '-':>6}"
                        for v in (self.warps, self.stages, self.block_n, self.maxnreg, scores))


# --sweep: 1, 2, 4 and 8 warps, the stages 1-3, 32 or 128 d_state columns a step and a cap of 128 or 168 registers
# (four or three programs an SM at 4 warps), each beside the module's others
SWEEP = ([Plan(w) for w in (1, 2, 4, 8)] + [Plan(None, st) for st in (1, 2, 3)]
         + [Plan(None, None, n) for n in (32, 128)] + [Plan(None, None, None, r) for r in (128, 168)])
# --sweep at rows past the one-tile kernels' (the blocked kernels' only): their warps
BLOCKED_SWEEP = [Plan(w) for w in (4, 8)]
# --sweep scores: the backward makes C B^T again, or reads the forward's
SCORES_SWEEP = [Plan(keep_scores=False), Plan(keep_scores=True)]


def parse_cell(text: str) -> tuple[int, int]:
    try:
        d_state, seq_len = (int(v) for v in text.split("/"))
    except ValueError:
        raise SystemExit(f"--cells: {text!r} is not d_state/LEN (e.g. 64/64)") from None
    if not 1 <= seq_len <= blocks.MAX_LEN or d_state < 1:
        raise SystemExit(f"--cells: {text!r}: LEN must be 1-{blocks.MAX_LEN} (the blocked kernels' rows; ours take "
                         f"1-{q.MAX_LEN}) and d_state positive")
    return d_state, seq_len


def make_inputs(d_state: int, seq_len: int, rows: int, device: str, dtype, seed: int = 0) -> dict:
    """The leaves (x, dt_raw, B, C in ``dtype`` as strided column slices; A, D, dt_bias fp32) and a grad of y."""
    gen = torch.Generator().manual_seed(seed)
    heads = D_INNER // HEADDIM
    xbc = torch.randn(rows, seq_len, D_INNER + 2 * d_state, generator=gen).to(device, dtype)
    wide_dt = (torch.randn(rows, seq_len, heads + 8, generator=gen) - 1.0).to(device, dtype)
    leaves = {
        "x": xbc[..., :D_INNER].unflatten(-1, (heads, HEADDIM)),
        "dt_raw": wide_dt[..., 8:],
        "A": -(torch.rand(heads, generator=gen) * 2 + 0.1).to(device),
        "B": xbc[..., D_INNER:D_INNER + d_state].unflatten(-1, (1, d_state)),
        "C": xbc[..., D_INNER + d_state:].unflatten(-1, (1, d_state)),
        "D": torch.randn(heads, generator=gen).to(device),
        "dt_bias": (torch.randn(heads, generator=gen) * 0.5).to(device),
    }
    # leaves that keep the slices' strides (detach() of a view is a view)
    leaves = {k: v.detach().requires_grad_() for k, v in leaves.items()}
    dy = torch.randn(rows, seq_len, heads, HEADDIM, generator=gen).to(device, dtype)
    return {"leaves": leaves, "dy": dy}


def torch_form(x, dt_raw, A, B, C, D, dt_bias):
    autocast = x.is_cuda and x.dtype != torch.float32
    with torch.autocast("cuda", dtype=x.dtype, enabled=autocast):
        y, _ = ssd_quadratic(x, positive_dt(dt_raw, dt_bias), A, B, C, return_final_state=False)
        return (y + x * D.to(x.dtype)[:, None]).to(x.dtype)


def ours(x, dt_raw, A, B, C, D, dt_bias):
    return q.ssd_quadratic_fused(x, dt_raw, A, B, C, D=D, dt_bias=dt_bias)


def blocked(x, dt_raw, A, B, C, D, dt_bias):
    """The 64-token-block kernels (what rows of 65-1024 tokens run), on these rows: dt made positive first, as the
    model does for them."""
    from lightning_mamba.models.kernels.ssd_blocked_triton import ssd_blocked

    return ssd_blocked(x, positive_dt(dt_raw, dt_bias), A, B, C, D=D)


def plan_applied(plan: Plan | None, fn=None) -> contextlib.ExitStack:
    """The settings of ``fn``'s module for ``plan`` (None: its own); restored after. The blocked kernels take only
    the plan's warps."""
    if fn is blocked:
        module, settings = blocks, {} if plan is None else {"NUM_WARPS": plan.warps or blocks.NUM_WARPS}
    else:
        module, settings = q, {} if plan is None else {"NUM_WARPS": plan.warps or q.NUM_WARPS,
                                                       "NUM_STAGES": plan.stages, "BLOCK_N": plan.block_n or q.BLOCK_N,
                                                       "MAXNREG": plan.maxnreg}
        if plan is not None and plan.keep_scores is not None:  # at every tile and d_state, or none
            settings["KEEP_SCORES_FROM_N"] = dict.fromkeys(q.KEEP_SCORES_FROM_N, 1 if plan.keep_scores else None)
    stack = contextlib.ExitStack()
    for name, value in settings.items():
        stack.enter_context(overridden(module, name, value))
    return stack


def launched(fn, d_state: int, seq_len: int) -> Plan | None:
    """The settings ``fn``'s launches read now (None for the torch form)."""
    if fn is ours:
        tile = q.block_l(seq_len)
        return Plan(q.num_warps(tile), q.NUM_STAGES, q.BLOCK_N, q.MAXNREG, q.keep_scores(tile, d_state))
    return Plan(blocks.NUM_WARPS) if fn is blocked else None


def forward_backward(fn, inputs: dict) -> list:
    leaves = inputs["leaves"]
    y = fn(**leaves)
    return [y, *torch.autograd.grad(y, list(leaves.values()), inputs["dy"])]


def check(fn, d_state: int, seq_len: int, device: str) -> tuple[bool, str]:
    """fp32 y and gradients of ``fn`` at up to CHECK_ROWS rows against the torch form's; (ok, text)."""
    inputs = make_inputs(d_state, seq_len, CHECK_ROWS, device, torch.float32, seed=1)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        try:
            got = forward_backward(fn, inputs)
        except Exception as e:  # a contender that raises is a FAIL with its message; the run goes on
            return False, f"FAIL ({type(e).__name__}: {str(e).splitlines()[0][:60]})"
        ref = forward_backward(torch_form, inputs)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    worst = max(_rel_err(a, b) for a, b in zip(got, ref, strict=True))
    return worst <= TOLERANCE, f"{'ok' if worst <= TOLERANCE else 'FAIL'} ({worst:.1e})"


def time_contender(fn, inputs: dict, measure) -> tuple[float, float]:
    """(forward, forward + backward) microseconds."""
    def fwd():
        with torch.no_grad():
            fn(**inputs["leaves"])

    return 1e3 * measure(fwd), 1e3 * measure(lambda: forward_backward(fn, inputs))


def run(cells: list[tuple[int, int]], tokens: int, device: str, dtype, sweep: str | None) -> int:
    measure = graph_timer if device == "cuda" else wall_timer
    failed = False
    print(f"{'cell':<9} {'contender':<20} {'warps':>6} {'stages':>6} {'cols':>6} {'regs':>6} {'scores':>6} {'check (fp32)':<16} "
          f"{'fwd us':>9} {'bwd us':>9} {'fwd+bwd':>9} {'x torch':>8} {'x ours':>7}")
    for d_state, seq_len in cells:
        if tokens % seq_len:
            raise SystemExit(f"--tokens {tokens} is not a multiple of LEN {seq_len}: give one that is")
        rows = tokens // seq_len
        inputs = make_inputs(d_state, seq_len, rows, device, dtype)
        cell = f"{d_state}/{seq_len}"
        one_tile = seq_len <= q.MAX_LEN  # past it only the blocked kernels take the rows ("x ours": theirs)
        contenders = [("torch form", torch_form, None)] + ([("ours", ours, None)] if one_tile else [])
        contenders += [("blocked kernels", blocked, None)]
        if sweep:
            plans = SCORES_SWEEP if sweep == "scores" else SWEEP
            contenders += ([("ours, plan", ours, plan) for plan in plans] if one_tile
                           else [("blocked, plan", blocked, plan) for plan in BLOCKED_SWEEP])
        base = default = None
        best = None
        for name, fn, plan in contenders:
            with plan_applied(plan, fn):  # checked at fewer rows, then timed, under the plan
                shown = launched(fn, d_state, seq_len)
                ok, text = check(fn, d_state, seq_len, device)
                failed |= not ok
                fwd, both = time_contender(fn, inputs, measure) if ok else (float("nan"),) * 2
            if name == "torch form":
                base = both
            else:  # the fastest of our kernels' contenders, the default plan's included
                default = both if name == ("ours" if one_tile else "blocked kernels") else default
                if ok and (best is None or both < best[0]):
                    best = (both, name, shown, fn)
            print(f"{cell:<9} {name:<20} {shown.label() if shown is not None else ' ' * 34} {text:<16} {fwd:9.1f} "
                  f"{both - fwd:9.1f} {both:9.1f} {base / both:8.2f} "
                  + (f"{default / both:7.2f}" if default is not None else f"{'':>7}"))
        if best is not None and default is not None:
            _, label, plan, fn = best
            how = (f" (warps {plan.warps})" if fn is blocked else
                   f" (warps {plan.warps}, stages {plan.stages or 'default'}, {plan.block_n} columns a step, "
                   f"registers {plan.maxnreg or 'default'}, C B^T {'kept' if plan.keep_scores else 'made again'})")
            print(f"{cell:<9} fastest: {label}{how}: {best[0]:.1f} us fwd+bwd, {default / best[0]:.2f}x "
                  f"{'ours' if one_tile else 'the blocked kernels'}")
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cells", default="16/32,64/64,128/64", help="comma list of d_state/LEN")
    p.add_argument("--tokens", type=int, default=16384, help="tokens a step (rows = tokens / LEN)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="what the timings run in")
    p.add_argument("--sweep", nargs="?", const="launch", choices=("launch", "scores"),
                   help="also time ours under every plan of SWEEP (scores: of SCORES_SWEEP)")
    args = p.parse_args(argv)
    if q.triton is None:
        print("# triton is not installed: our kernels cannot run")
        return 1
    cells = [parse_cell(c) for c in args.cells.split(",") if c]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gpu = f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""
    print(f"# torch {torch.__version__}, triton {q.triton.__version__}, device {args.device}{gpu}, timings in "
          f"{args.dtype}, {args.tokens:,} tokens a step, {D_INNER // HEADDIM} heads of {HEADDIM}, one group")
    return run(cells, args.tokens, args.device, dtype, args.sweep)


if __name__ == "__main__":
    sys.exit(main())
