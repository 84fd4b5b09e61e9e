"""Where a training step's GPU time goes: kernels of a few bare-loop steps, grouped by what they do.

    python benchmarks/profile_step.py --config 130m                     # ours and mamba_ssm's bare loops
    python benchmarks/profile_step.py --config 130m --contenders ours --top 40
    python benchmarks/profile_step.py --config 130m --contenders ours --ops 30   # also the torch ops behind them
    python benchmarks/profile_step.py --config 130m --contenders ours,mamba_ssm_fused   # needs causal-conv1d
    python benchmarks/profile_step.py --config 130m --contenders ours --save_chunk_states   # the scan keeps its states
    python benchmarks/profile_step.py --config 130m --contenders ours --recompute_norm_output   # in_proj's input remade
    python benchmarks/profile_step.py --config cell --d_state 2048 --seq_len 16 --quadratic_max_len 64   # a study cell
    python benchmarks/profile_step.py --config cell --device cpu --d_state 16 --tokens_per_step 512 --steps 1  # smoke

Same models, batch, precision and loss as ``train_throughput.py`` (its builders are reused; ours trains
with MambaLM.loss). Prints, per contender,
the CUDA time per step in each group (SSD scan, conv, norms, matmuls, loss, optimizer, the rest) and the
costliest kernels, so a fusion can be aimed at what actually costs time, and (CUDA) the eager step's peak memory. ``--config cell`` is the study's 4 x 256
byte-level model at 16,384 tokens per step (``--d_state``, ``--seq_len``, ``--tokens_per_step`` pick the cell; ours
takes ``--chunk_size``, ``--quadratic_max_len``, ``--save_chunk_states`` and ``--recompute_norm_output``). On the CPU (a smoke run) it groups the ops' own CPU time.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import CONFIGS, Skip, bare_loop, build_bare  # noqa: E402

GROUPS = [  # first match wins; kernel names of mamba_ssm's Triton kernels, cuBLAS/CUTLASS, ATen
    ("ssd scan", r"chunk_scan|chunk_state|state_passing|bmm_chunk|chunk_cumsum|ssd|dstates|ddA|dcb"),
    ("conv", r"conv|depthwise|causal"),
    ("norms", r"layer_norm|rmsnorm|rms_norm|_layer_norm"),
    ("matmul", r"gemm|cutlass|nvjet|sm90|sm80|cublas|xmma|matmul|^aten::(mm|addmm|bmm|linear)$"),
    ("loss", r"softmax|nll|cross_entropy|log_softmax|xent"),
    ("optimizer", r"adam|multi_tensor|foreach|norm_kernel|clip"),
]


def group_of(name: str) -> str:
    low = name.lower()
    return next((g for g, pat in GROUPS if re.search(pat, low)), "elementwise / copies")


# the study's cells: 4 x 256, byte vocabulary, headdim 32 (configs/experiment/regime.yaml); d_state, LEN and the
# batch (16,384 tokens per step) come from the flags
CELL = (256, 4, 512, 257, 512, 32, 32)


def shape(args) -> tuple:
    """The config's (d_model, n_layer, d_state, vocab, batch, seq_len, headdim) with the flags given replacing
    its fields; --tokens_per_step sets the batch to tokens_per_step / seq_len."""
    d_model, n_layer, d_state, vocab, batch, seq_len, headdim = CELL if args.config == "cell" else CONFIGS[args.config]
    seq_len = args.seq_len or seq_len
    tokens = args.tokens_per_step or (16384 if args.config == "cell" else None)
    if tokens is not None:
        if tokens % seq_len:
            raise SystemExit(f"--tokens_per_step {tokens} is not a multiple of --seq_len {seq_len}: give one that is")
        batch = tokens // seq_len
    return (args.d_model or d_model, args.n_layer or n_layer, args.d_state or d_state, args.vocab or vocab, batch,
            seq_len, args.headdim or headdim)


def profile(model, loss_fn, cfg, device, steps: int, top: int, ops: int = 0) -> dict:
    """Prints and returns the time per step by group (ms): CUDA kernels, or on the CPU the ops' own time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    d_model, n_layer, d_state, vocab, batch, seq_len, headdim = cfg
    dtype = torch.bfloat16 if device == "cuda" else None
    bare_loop(model, batch, seq_len, vocab, 2, 1, device, dtype, loss_fn)  # compile Triton kernels first
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    wall = bare_loop(model, batch, seq_len, vocab, steps, 0, device, dtype, loss_fn) * 1e3
    # the eager step's peak (weights, optimizer state, activations): a memory A/B in the same process as the times
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    with torch_profile(activities=[activity]) as prof:
        bare_loop(model, batch, seq_len, vocab, steps, 0, device, dtype, loss_fn)
    per_kernel = defaultdict(float)
    for evt in prof.events():
        if device == "cuda" and evt.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[evt.name] += evt.time_range.elapsed_us() / 1e3 / steps  # ms per step
        elif device != "cuda" and evt.device_type == torch.autograd.DeviceType.CPU and evt.self_cpu_time_total > 0:
            per_kernel[evt.name] += evt.self_cpu_time_total / 1e3 / steps  # own time: nested ops counted once
    total = sum(per_kernel.values())
    groups = defaultdict(float)
    for name, ms in per_kernel.items():
        groups[group_of(name)] += ms
    # kernel time well below the wall time: the GPU waits for the CPU (launch / Python overhead)
    print(f"  {'GPU kernel' if device == 'cuda' else 'CPU op'} time per step: {total:.1f} ms; wall time per step "
          f"without the profiler: {wall:.1f} ms" + (f"; peak memory {peak:.2f} GiB (eager)" if peak is not None else ""))
    for g, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {g:>22}: {ms:8.2f} ms  {ms / total:6.1%}")
    print(f"  top {top} kernels (ms/step, group, name):")
    for name, ms in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {ms:8.2f}  {group_of(name):>20}  {name[:110]}")
    if ops:  # which torch ops (with their inputs' shapes) launched the kernels: a second profiled run
        with torch_profile(activities=sorted({ProfilerActivity.CPU, activity}, key=str), record_shapes=True) as prof:
            bare_loop(model, batch, seq_len, vocab, steps, 0, device, dtype, loss_fn)
        key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        print(f"  top {ops} torch ops by their own {'CUDA' if device == 'cuda' else 'CPU'} time ({steps} steps):")
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by=key, row_limit=ops, max_name_column_width=48, max_shapes_column_width=90))
    return dict(groups, total=total, wall=wall, **({"peak_gib": peak} if peak is not None else {}))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted([*CONFIGS, "cell"]), default="130m")
    p.add_argument("--contenders", default=None, help="comma list of: ours, mamba_ssm (unfused), mamba_ssm_fused "
                   "(default: ours,mamba_ssm; --config cell, --device cpu or a mixer setting: ours)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--ops", type=int, default=0, help="also list this many torch ops (input shapes, own GPU time)")
    for name in ("d_model", "n_layer", "d_state", "vocab", "seq_len", "headdim", "tokens_per_step"):
        p.add_argument(f"--{name}", type=int, default=None, help="replaces the config's")
    p.add_argument("--chunk_size", type=int, default=None, help="ours: the SSD's chunk (the model's default: 256)")
    p.add_argument("--quadratic_max_len", type=int, default=None,
                   help="ours: rows of at most this many tokens take the SSD's attention form")
    p.add_argument("--save_chunk_states", action="store_const", const=True, default=None,
                   help="ours: the chunked scan's backward reuses the forward's states (the model's save_chunk_states)")
    p.add_argument("--recompute_norm_output", action="store_const", const=True, default=None,
                   help="ours: in_proj's input made again in the backward (the model's recompute_norm_output)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("profile_step.py profiles CUDA kernels: run it on a machine with a GPU (or --device cpu, a smoke run)")
    cfg = shape(args)
    extra = {k: getattr(args, k) for k in ("chunk_size", "quadratic_max_len", "save_chunk_states", "recompute_norm_output")
             if getattr(args, k) is not None}
    ours_only = args.config == "cell" or args.device == "cpu" or extra
    contenders = (args.contenders or ("ours" if ours_only else "ours,mamba_ssm")).split(",")
    host = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# config {args.config} (d_model, n_layer, d_state, vocab, batch, seq_len, headdim) = {cfg}, "
          f"mixer {extra or 'defaults'}, {'bf16 autocast' if args.device == 'cuda' else 'fp32'}, {host}, "
          f"torch {torch.__version__}")
    results = {}
    for c in contenders:
        print(f"== {c}")
        try:
            model, loss_fn = build_bare(c, cfg, args.device, extra if c == "ours" else None)
        except (ImportError, Skip) as e:  # as train_throughput.py: a contender that cannot run here is named, not fatal
            print(f"  skipped ({e})")
            continue
        results[c] = profile(model, loss_fn, cfg, args.device, args.steps, args.top, args.ops)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    main()
