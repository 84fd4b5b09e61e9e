"""Is a training step bound by the GPU or by the CPU that enqueues its kernels? (GPU)

    python benchmarks/step_timeline.py --config 130m

For our bare loop (MambaLM.loss, AdamW, clipping, bf16 autocast; train_throughput.py's builders) it times each
step from a synchronised start: the CPU time to enqueue the whole step (forward, backward, clip, optimizer) and
the wall time until the GPU has finished it. Enqueue time close to the wall time means the GPU waits for Python
and launches, and only less CPU work per step (fewer, larger kernels) makes it faster; enqueue time well below
means the kernels themselves set the pace. Also prints the unsynchronised loop's time per step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import CONFIGS, bare_loop, build_bare, train_step  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="130m")
    p.add_argument("--contender", default="ours", help="ours or mamba_ssm")
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("step_timeline.py times CUDA steps: run it on a machine with a GPU")
    d_model, n_layer, d_state, vocab, batch, seq_len, headdim = cfg = CONFIGS[args.config]
    model, loss_fn = build_bare(args.contender, cfg, "cuda")
    free_running = bare_loop(model, batch, seq_len, vocab, args.steps, 3, "cuda", torch.bfloat16, loss_fn)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, vocab, (batch, seq_len + 1), device="cuda")
    enqueue, wall = [], []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(model, opt, ids, "cuda", torch.bfloat16, loss_fn)
        enqueue.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - t0)
    ms = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    print(f"# config {args.config}, {args.contender}, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"free-running loop: {free_running * 1e3:.1f} ms/step | synchronised steps (median of {args.steps}): "
          f"CPU enqueue {ms(enqueue):.1f} ms, wall {ms(wall):.1f} ms, enqueue/wall {ms(enqueue) / ms(wall):.2f}")


if __name__ == "__main__":
    main()
