"""What the first length-generalization evaluation of a process costs against the ones after it.

    python benchmarks/first_evaluation.py                                   # a study cell: d_state 512, 32K tokens
    python benchmarks/first_evaluation.py --headdim 64 --profile 45        # the model of the recorded H100 figures
    python benchmarks/first_evaluation.py --d_state 128 --length 4096 --profile 30
    python benchmarks/first_evaluation.py --kernels 25                      # where a later call's GPU time goes
    python benchmarks/first_evaluation.py --variants chunk=128,chunk=256,tf32,chunk=256+tf32  # same-process A/B

The regime cells' callback evaluates 32 held-out rows of 32K tokens in fp32, 2,048 tokens at a time, carrying the
state. The first time a process does that on a GPU, mamba_ssm's scan kernels are compiled for the evaluation's shapes
(once per machine: Triton keeps compiled kernels on disk) and autotuned (once per process, unless Triton keeps the
choices too: TRITON_CACHE_AUTOTUNING, which the backend switch turns on). Run it twice to see a second process.
The baseline is the same evaluation run again in the same process. ``--profile N`` prints the first call's N
costliest Python functions (cProfile, cumulative): compilers and autotuning show there by name.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cell_throughput's build_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d_state", type=int, default=512)
    p.add_argument("--seq_len", type=int, default=32, help="T_train (the report's windows)")
    p.add_argument("--length", type=int, default=32768, help="tokens per evaluated row")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--piece_len", type=int, default=2048)
    # the model: the study's cell (configs/experiment/regime.yaml), built by cell_throughput.py's build_model
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--headdim", type=int, default=32)
    p.add_argument("--expand", type=int, default=2)
    p.add_argument("--vocab", type=int, default=257)
    p.add_argument("--chunk_size", type=int, default=64, help="the scan's chunk (the regime config's 64); the "
                   "evaluation's long rows run the chunked scan in it, so this is its A/B")
    p.add_argument("--quadratic_max_len", type=int, default=256)
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--profile", type=int, default=0, help="print the first call's N costliest functions")
    p.add_argument("--variants", default="", help="comma-separated, each timed in this process against the "
                   "later calls: chunk=N (the evaluation's chunk_size), tf32 or bf16 (its dtype: float32 matmuls on "
                   "TF32 tensor cores, as mamba_ssm's Triton scan already runs its fp32 dot products, or the whole "
                   "evaluation in bfloat16), or several joined by '+' (chunk=256+tf32); with the largest change of a "
                   "position's loss, ratio_16_64x and ratio_far against the baseline")
    p.add_argument("--kernels", type=int, default=0, help="print a later call's N costliest operators on the "
                   "device (torch.profiler, self time): where an evaluation's GPU time goes")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    import torch
    from cell_throughput import build_model

    from lightning_mamba.analysis.forgetting import measure_forgetting

    print(f"imports {time.perf_counter() - t0:.1f} s; TRITON_CACHE_AUTOTUNING="
          f"{os.environ.get('TRITON_CACHE_AUTOTUNING', '(unset; the backend switch sets 1)')}", flush=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.backend, args.save_chunk_states = "auto", True  # the study config's
    model = build_model(args, args.d_state, device).eval()
    rows = torch.randint(0, 256, (args.rows, args.length + 1), generator=torch.Generator().manual_seed(0))

    def evaluate(**settings):
        settings = {"dtype": "float32", **settings}
        report = measure_forgetting(model, rows, args.seq_len, piece_len=args.piece_len, **settings)
        if device == "cuda":
            torch.cuda.synchronize()
        return report

    def timed(**settings):
        """One evaluation: (seconds, its report)."""
        t = time.perf_counter()
        report = evaluate(**settings)
        return time.perf_counter() - t, report

    profile = cProfile.Profile()
    profile.enable()
    first, _ = timed()
    profile.disable()
    runs = [timed(), timed()]
    later, baseline = [t for t, _ in runs], runs[-1][1]  # the variants' results are compared with this report
    print(f"first evaluation {first:.2f} s; then {later[0]:.3f} s, {later[1]:.3f} s (baseline: the same evaluation "
          f"again, same process): x {first / min(later):.1f}")
    for variant in filter(None, args.variants.split(",")):
        settings = variant_settings(variant)
        evaluate(**settings)  # compiles and autotunes for new shapes
        runs = [timed(**settings), timed(**settings)]
        times = [t for t, _ in runs]
        print(f"variant {variant}: {min(times):.3f} s, x {min(later) / min(times):.2f} the baseline's speed; "
              + differences(baseline, runs[-1][1]))
    if args.profile:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("cumtime").print_stats(args.profile)
        print("\n".join(line[:200] for line in out.getvalue().splitlines() if line.strip()))
    if args.kernels:
        print(kernel_table(timed, device, args.kernels))
    return 0


def variant_settings(variant: str) -> dict:
    """``measure_forgetting``'s settings for ``variant``: chunk=N (its ``chunk_size``), tf32 or bf16 (its
    ``dtype``), or several of them joined by '+': the callbacks' own settings of those names."""
    settings: dict = {}
    for part in variant.split("+"):
        name, _, value = part.partition("=")
        if name == "chunk" and value.isdigit() and "chunk_size" not in settings:
            settings["chunk_size"] = int(value)
        elif part in ("tf32", "bf16") and "dtype" not in settings:
            settings["dtype"] = part
        else:
            raise SystemExit(f"--variants: {variant!r} is none of chunk=N, tf32, bf16 or '+' of a chunk and a dtype")
    return settings


def differences(a, b) -> str:
    """How far report ``b`` is from ``a``: the largest change of a position's mean loss, and of the two ratios."""
    worst = float(abs(a.per_position - b.per_position).max())

    def moved(x, y) -> str:
        return "-" if x is None or y is None else f"{x:.6f} -> {y:.6f}"  # None: rows shorter than 64 T

    return (f"largest change of a position's loss {worst:.2e}; "
            f"ratio_16_64x {moved(a.verdict.ratio_16_64x, b.verdict.ratio_16_64x)}; "
            f"ratio_far {moved(a.far['ratio_far'], b.far['ratio_far'])}")


def kernel_table(run, device: str, rows: int) -> str:
    """``run()`` once under torch.profiler; its ``rows`` operators with the most self time on the device (the CPU's
    when there is no GPU), as torch's table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


if __name__ == "__main__":
    sys.exit(main())
