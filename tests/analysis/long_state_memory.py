"""Peak memory of ``state_statistics`` on a long input, on CPU (not a test: ~a minute; run it by hand).

    OMP_NUM_THREADS=1 .venv/bin/python -m tests.analysis.long_state_memory [--rows 8] [--length 16384] [--stride 16]
        [--out stats.npz]

A random MambaLM (d_model 64, 2 layers, d_state 128, headdim 64: 2 heads, 64 KB of SSM state per layer and row),
nothing trained. Prints the peak RSS of the process (ru_maxrss) before and after the state statistics, the seconds
they took and, with --out, writes the statistics so two versions of the code can be compared (PYTHONPATH=<an older
checkout> runs that one's package). One thread: on a shared 2-core machine two threads spin-waiting on each other made
the many small ops several times slower. The RSS includes what the allocator keeps after tensors are freed.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from lightning_mamba.analysis.state_stats import state_statistics
from lightning_mamba.models import MambaConfig, MambaLM


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=32)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=64, n_layer=2, vocab_size=256, ssm_cfg={"layer": "Mamba2", "d_state": 128})
    model = MambaLM(cfg, backend="torch").eval()
    tokens = torch.randint(0, 256, (args.rows, args.length))
    before = peak_rss_mb()
    t0 = time.perf_counter()
    stats = state_statistics(model, tokens, seq_len=args.seq_len, stride=args.stride)
    seconds = time.perf_counter() - t0
    print(f"{args.rows} rows x {args.length} tokens, stride {args.stride}: {stats.positions.size} samples; "
          f"peak RSS {before:.0f} MB before, {peak_rss_mb():.0f} MB after state_statistics ({seconds:.1f} s)")
    if args.out:
        np.savez(args.out, **{k: v for k, v in vars(stats).items() if isinstance(v, np.ndarray)})


if __name__ == "__main__":
    main()
