"""Our Triton norms (models/kernels/norm_triton.py, what the model runs on the GPU) against mamba_ssm's and the
torch path, same process, forward and forward + backward; ``--sweep``: ours under other tile plans.

    python benchmarks/norm_kernel.py                      # GPU: 130m, 370m and the study cell's shapes, bf16
    python benchmarks/norm_kernel.py --shape 130m
    python benchmarks/norm_kernel.py --shape 130m --sweep   # ours under other tile plans (SWEEP)
    TRITON_INTERPRET=1 python benchmarks/norm_kernel.py --device cpu --shape tiny   # smoke run, wall-clock times

The norms as a block calls them: ``add`` = residual add + RMSNorm (h in --dtype, the residual stream in fp32,
``residual_in_fp32``; both outputs get a gradient, as in the model, where the residual stream goes on to the next
block) over d_model; ``gated`` = the mixer's gated RMSNorm (y and z in --dtype, norm_before_gate=False) over
d_inner in groups. Correctness first: every contender runs once in fp32 and its outputs and gradients are compared
with models/norm.py's (max |a - ref| / max |ref|, FAIL above 1e-4; a FAIL sets exit status 1). Times: median
microseconds (triton.testing.do_bench on CUDA), ratio = mamba_ssm / ours (> 1: ours faster).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conv_kernel import _rel_err, cuda_timer, graph_timer, wall_timer  # noqa: E402

from lightning_mamba.models.norm import RMSNorm, RMSNormGated  # noqa: E402

EPS = 1e-5
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Shape:
    name: str
    rows: int  # tokens per step
    d_model: int
    d_inner: int
    group_size: int


SHAPES = {s.name: s for s in (
    Shape("130m", 16 * 2048, 768, 1536, 1536),
    Shape("370m", 16 * 2048, 1024, 2048, 2048),
    Shape("cell", 16384, 256, 512, 512),  # the study's 4 x 256 model at 16,384 tokens per step
    Shape("tiny", 70, 48, 96, 48),  # CPU smoke run
)}


def torch_add(h, residual, weight):
    res = (h + residual).float()
    return functional_call(RMSNorm(h.shape[-1], EPS).to(h.device), {"weight": weight}, (res,)).to(h.dtype), res


def torch_gated(y, z, weight, group_size):
    norm = RMSNormGated(y.shape[-1], group_size, EPS).to(y.device)
    return functional_call(norm, {"weight": weight}, (y, z))


def contenders(device: str) -> dict[str, dict]:
    """name -> {"add": fn(h, residual, weight), "gated": fn(y, z, weight, group_size)} or a reason it cannot run."""
    out: dict[str, dict | str] = {"torch": {"add": torch_add, "gated": torch_gated}}
    from lightning_mamba.models.kernels import norm_triton

    if norm_triton.triton is None:
        out["ours"] = "triton is not installed"
    else:
        out["ours"] = {"add": lambda h, r, w: norm_triton.add_rmsnorm(h, r, w, EPS, True),
                       "gated": lambda y, z, w, g: norm_triton.gated_rmsnorm(y, z, w, EPS, g)}
    if device != "cuda":
        out["mamba_ssm"] = "its Triton kernels need CUDA"
        return out
    from lightning_mamba.models.kernels.backend import _triton_norms

    fns = _triton_norms()
    if fns is None:
        out["mamba_ssm"] = "mamba_ssm's Triton kernels are not importable"
    else:
        rms_norm_fn, rmsnorm_fn = fns
        out["mamba_ssm"] = {
            "add": lambda h, r, w: rms_norm_fn(h, w, None, residual=r, prenorm=True, residual_in_fp32=True, eps=EPS),
            "gated": lambda y, z, w, g: rmsnorm_fn(y, w, None, z=z, eps=EPS, group_size=g, norm_before_gate=False)}
    return out


def make_inputs(shape: Shape, norm: str, device: str, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """Leaf inputs of one call (the same values in any dtype for one seed)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*size, dt=dtype, scale=1.0):
        return (scale * torch.randn(*size, generator=g)).to(device, dt).requires_grad_()

    width = shape.d_model if norm == "add" else shape.d_inner
    weight = (1 + 0.2 * torch.randn(width, generator=g)).to(device).requires_grad_()
    if norm == "add":
        return [randn(shape.rows, width), randn(shape.rows, width, dt=torch.float32), weight]
    return [randn(shape.rows, width), randn(shape.rows, width), weight]


def call(fn, norm: str, inputs: list[torch.Tensor], shape: Shape):
    outs = fn(*inputs) if norm == "add" else fn(*inputs, shape.group_size)
    return list(outs) if isinstance(outs, tuple) else [outs]


def forward_backward(fn, norm: str, inputs, shape: Shape, grads_out) -> list[torch.Tensor]:
    outs = call(fn, norm, inputs, shape)
    return outs + list(torch.autograd.grad(outs, inputs, grads_out[:len(outs)]))


def check(fn, norm: str, shape: Shape, device: str) -> tuple[bool, str]:
    """fp32 outputs and gradients of ``fn`` against the torch norm's; (ok, text)."""
    inputs = make_inputs(shape, norm, device, torch.float32)
    g = torch.Generator().manual_seed(1)
    grads_out = [torch.randn(shape.rows, inputs[0].shape[-1], generator=g).to(device) for _ in range(2)]
    try:
        got = forward_backward(fn, norm, inputs, shape, grads_out)
    except Exception as e:  # a contender that raises is a FAIL with its message, the run goes on
        return False, f"FAIL ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    ref = forward_backward(contenders("cpu")["torch"][norm], norm, inputs, shape, grads_out)
    errs = [_rel_err(a, b) for a, b in zip(got, ref, strict=True)]
    worst = max(errs)
    return worst <= TOLERANCE, f"{'ok' if worst <= TOLERANCE else 'FAIL'} ({worst:.1e})"


def time_norm(fn, norm: str, shape: Shape, device: str, dtype, measure) -> tuple[float, float]:
    """(forward, forward + backward) microseconds; ``measure``: conv_kernel's cuda_timer or wall_timer (ms)."""
    inputs = make_inputs(shape, norm, device, dtype)
    grads_out = [torch.randn_like(t) for t in call(fn, norm, inputs, shape)]

    def fwd():
        with torch.no_grad():
            call(fn, norm, inputs, shape)

    return 1e3 * measure(fwd), 1e3 * measure(lambda: forward_backward(fn, norm, inputs, shape, grads_out))


def run(shapes: list[Shape], device: str, dtype) -> int:
    fns = contenders(device)
    measure = cuda_timer if device == "cuda" else wall_timer
    failed = False
    for name, why in fns.items():
        if isinstance(why, str):
            print(f"# {name}: skipped: {why}")
    print(f"{'shape':<6} {'norm':<6} {'contender':<10} {'check (fp32)':<16} {'fwd us':>9} {'fwd+bwd us':>11}")
    for shape in shapes:
        for norm in ("add", "gated"):
            times = {}
            for name, fn in fns.items():
                if isinstance(fn, str):
                    continue
                ok, text = check(fn[norm], norm, shape, device)
                failed |= not ok
                fwd, both = time_norm(fn[norm], norm, shape, device, dtype, measure) if ok else (float("nan"),) * 2
                times[name] = (fwd, both)
                print(f"{shape.name:<6} {norm:<6} {name:<10} {text:<16} {fwd:9.1f} {both:11.1f}")
            if "ours" in times and "mamba_ssm" in times:
                (of, ob), (mf, mb) = times["ours"], times["mamba_ssm"]
                print(f"{shape.name:<6} {norm:<6} mamba_ssm / ours: fwd {mf / of:.2f}x, fwd+bwd {mb / ob:.2f}x "
                      "(> 1: ours faster)")
    return 1 if failed else 0


# the fields of norm_triton.TilePlan, each over these values
SWEEP = dict(tile_elements=(2048, 4096, 8192), programs_per_sm=(4, 8, 16), elements_per_thread=(8, 16),
             prefetch=(False, True))


def sweep(shapes: list[Shape], device: str, dtype) -> int:
    """Our kernels under every plan of SWEEP (norm_triton.TilePlan: tile size, backward programs per SM, elements per
    thread, the backward's prefetch of its next tile), per norm, in the PLANS entry the shape takes (the plan column:
    norm_triton.plan_key): each plan checked in fp32, then timed from a CUDA
    graph (graph_timer); the backward alone is
    fwd+bwd - fwd. The module's plans are restored."""
    import itertools

    from lightning_mamba.models.kernels import norm_triton

    fns = contenders(device)["ours"]
    if isinstance(fns, str):
        print(f"# ours: skipped: {fns}")
        return 1
    measure = graph_timer if device == "cuda" else wall_timer
    default = dict(norm_triton.PLANS)
    failed = False
    print(f"{'shape':<6} {'plan':<12} {'tile':>5} {'progs/SM':>8} {'el/thr':>6} {'pref':>4} {'check (fp32)':<16} "
          f"{'fwd us':>9} {'bwd us':>9}")
    try:
        for shape in shapes:
            for norm in ("add", "gated"):
                best = None
                # the plan this shape's rows take (the gated norm over narrow groups has its own)
                key = norm_triton.plan_key(norm, shape.d_model if norm == "add" else shape.group_size)
                for plan in itertools.product(*SWEEP.values()):
                    norm_triton.PLANS[key] = norm_triton.TilePlan(**dict(zip(SWEEP, plan)))
                    ok, text = check(fns[norm], norm, shape, device)
                    failed |= not ok
                    fwd, both = time_norm(fns[norm], norm, shape, device, dtype, measure) if ok else (float("nan"),) * 2
                    mark = " (default)" if norm_triton.PLANS[key] == default[key] else ""
                    pref = "yes" if plan[3] else "no"
                    print(f"{shape.name:<6} {key:<12} {plan[0]:>5} {plan[1]:>8} {plan[2]:>6} {pref:>4} {text:<16} "
                          f"{fwd:9.1f} {both - fwd:9.1f}{mark}")
                    if ok and (best is None or both - fwd < best[0]):
                        best = (both - fwd, plan)
                norm_triton.PLANS[key] = default[key]
                if best is not None:
                    print(f"{shape.name:<6} {key:<12} fastest backward: {best[0]:.1f} us at tile {best[1][0]}, "
                          f"{best[1][1]} programs/SM, {best[1][2]} elements/thread, "
                          f"prefetch {'on' if best[1][3] else 'off'}")
    finally:
        norm_triton.PLANS.update(default)
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), action="append", default=None,
                   help="repeatable; default: 130m, 370m and cell")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="what the timings run in")
    p.add_argument("--sweep", action="store_true", help="time our kernels under other tile plans instead (SWEEP)")
    args = p.parse_args(argv)
    shapes = [SHAPES[s] for s in (args.shape or ["130m", "370m", "cell"])]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(f"# torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "") + f", timings in {args.dtype}")
    return (sweep if args.sweep else run)(shapes, args.device, dtype)


if __name__ == "__main__":
    sys.exit(main())
