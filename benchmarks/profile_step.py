"""Where a training step's GPU time goes: kernels of a few bare-loop steps, grouped by what they do.

    python benchmarks/profile_step.py --config 130m                     # ours and mamba_ssm's bare loops
    python benchmarks/profile_step.py --config 130m --contenders ours --top 40

Same models, batch, precision and loss as ``train_throughput.py`` (its builders are reused; ours trains
with MambaLM.loss). Prints, per contender,
the CUDA time per step in each group (SSD scan, conv, norms, matmuls, loss, optimizer, the rest) and the
costliest kernels, so a fusion can be aimed at what actually costs time.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import CONFIGS, bare_loop, build_bare  # noqa: E402

GROUPS = [  # first match wins; kernel names of mamba_ssm's Triton kernels, cuBLAS/CUTLASS, ATen
    ("ssd scan", r"chunk_scan|chunk_state|state_passing|bmm_chunk|chunk_cumsum|ssd|dstates|ddA|dcb"),
    ("conv", r"conv|depthwise|causal"),
    ("norms", r"layer_norm|rmsnorm|rms_norm|_layer_norm"),
    ("matmul", r"gemm|cutlass|nvjet|sm90|sm80|cublas|xmma|matmul"),
    ("loss", r"softmax|nll|cross_entropy|log_softmax|xent"),
    ("optimizer", r"adam|multi_tensor|foreach|norm_kernel|clip"),
]


def group_of(name: str) -> str:
    low = name.lower()
    return next((g for g, pat in GROUPS if re.search(pat, low)), "elementwise / copies")


def profile(model, loss_fn, cfg, device, steps: int, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    d_model, n_layer, d_state, vocab, batch, seq_len, headdim = cfg
    bare_loop(model, batch, seq_len, vocab, 2, 1, device, torch.bfloat16, loss_fn)  # compile Triton kernels first
    wall = bare_loop(model, batch, seq_len, vocab, steps, 0, device, torch.bfloat16, loss_fn) * 1e3
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        bare_loop(model, batch, seq_len, vocab, steps, 0, device, torch.bfloat16, loss_fn)
    per_kernel = defaultdict(float)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[evt.name] += evt.time_range.elapsed_us() / 1e3 / steps  # ms per step
    total = sum(per_kernel.values())
    groups = defaultdict(float)
    for name, ms in per_kernel.items():
        groups[group_of(name)] += ms
    # kernel time well below the wall time: the GPU waits for the CPU (launch / Python overhead)
    print(f"  GPU kernel time per step: {total:.1f} ms; wall time per step without the profiler: {wall:.1f} ms")
    for g, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {g:>22}: {ms:8.2f} ms  {ms / total:6.1%}")
    print(f"  top {top} kernels (ms/step, group, name):")
    for name, ms in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {ms:8.2f}  {group_of(name):>20}  {name[:110]}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="130m")
    p.add_argument("--contenders", default="ours,mamba_ssm", help="comma list of: ours, mamba_ssm")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_step.py profiles CUDA kernels: run it on a machine with a GPU")
    cfg = CONFIGS[args.config]
    print(f"# config {args.config} {cfg}, bf16 autocast, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for c in args.contenders.split(","):
        print(f"== {c}")
        model, loss_fn = build_bare(c, cfg, "cuda")
        profile(model, loss_fn, cfg, "cuda", args.steps, args.top)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
