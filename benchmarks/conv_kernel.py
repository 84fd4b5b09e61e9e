"""The fused Triton causal conv1d + SiLU (models/conv_triton.py) against the torch path it replaces (GPU).

    python benchmarks/conv_kernel.py                 # the 130M model's conv: b 16, l 2048, d 1792, k 4, bf16
    python benchmarks/conv_kernel.py --sweep         # also try other tile sizes

Times forward and forward + backward (grads of u, weight, bias) with triton.testing.do_bench, u laid out as in
the model (a column slice of in_proj's output), and prints the ratio torch / triton; with and without seq_idx.
The triton backward is timed both ways (conv_triton.BWD_SPLIT False: one kernel; True: two streaming kernels),
also alone (conv_triton._backward), with the split one's bandwidth on the 14 bytes per element it must move
(read u, dy; write and read back fp32 g; write grad u).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--d_model", type=int, default=768)
    p.add_argument("--d_state", type=int, default=128)
    p.add_argument("--sweep", action="store_true", help="also time other tile sizes")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("conv_kernel.py times CUDA kernels: run it on a machine with a GPU")
    from triton.testing import do_bench

    from lightning_mamba.models import conv_triton as ct
    from lightning_mamba.models.conv import causal_conv1d

    b, l, d_inner, k = args.batch, args.seq_len, 2 * args.d_model, 4
    d = d_inner + 2 * args.d_state  # conv_dim: x, B, C
    width = 2 * d_inner + 2 * args.d_state + d_inner // 64  # in_proj's output: z, xBC, dt
    wide = torch.randn(b, l, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    u = wide[:, :, d_inner:d_inner + d]
    weight = torch.randn(d, 1, k, device="cuda", requires_grad=True)
    bias = torch.randn(d, device="cuda", requires_grad=True)
    seq_idx = torch.zeros(b, l, dtype=torch.int32, device="cuda")
    seq_idx[:, l // 2:] = 1
    grad = torch.randn(b, l, d, device="cuda", dtype=torch.bfloat16)

    def torch_path(s):
        return F.silu(causal_conv1d(u, weight, bias, None, s)[0])

    def triton_path(s):
        return ct.causal_conv1d_silu(u, weight, bias, None, s)[0]

    def times(fn, s):
        fwd = do_bench(lambda: fn(s))
        both = do_bench(lambda: torch.autograd.grad(fn(s), [u, weight, bias], grad))
        return fwd, both

    def bwd_alone(s):
        with torch.no_grad():
            return do_bench(lambda: ct._backward(grad, u, weight, bias, None, s))

    def with_split(split, fn, *a):
        ct.BWD_SPLIT = split
        try:
            return fn(*a)
        finally:
            ct.BWD_SPLIT = False

    split_bytes = b * l * d * (2 + 2 + 4 + 4 + 2)
    print(f"# b {b}, l {l}, d {d} (row stride {width}), k {k}, bf16, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for s, name in ((None, "no seq_idx"), (seq_idx, "seq_idx")):
        (tf, tb), (rf, rb) = times(torch_path, s), with_split(False, times, triton_path, s)
        print(f"{name:>10}: torch fwd {tf * 1e3:7.0f} us, fwd+bwd {tb * 1e3:7.0f} us | triton fwd {rf * 1e3:7.0f} us, "
              f"fwd+bwd {rb * 1e3:7.0f} us | ratio torch/triton fwd {tf / rf:.2f}, fwd+bwd {tb / rb:.2f}")
        sb = with_split(True, times, triton_path, s)[1]
        fused_alone, split_alone = with_split(False, bwd_alone, s), with_split(True, bwd_alone, s)
        print(f"{name:>10}: triton BWD_SPLIT fwd+bwd {sb * 1e3:7.0f} us | ratio torch/triton fwd+bwd {tb / sb:.2f} | "
              f"bwd alone: one kernel {fused_alone * 1e3:.0f} us, split {split_alone * 1e3:.0f} us "
              f"({split_bytes / split_alone / 1e6:.0f} GB/s), one/split {fused_alone / split_alone:.2f}")
    if args.sweep:
        base = ct.FWD_BLOCK_L, ct.FWD_BLOCK_D, ct.FWD_WARPS
        for cfg in [(64, 128, 8), (32, 128, 4), (32, 64, 4), (128, 64, 8)]:
            ct.FWD_BLOCK_L, ct.FWD_BLOCK_D, ct.FWD_WARPS = cfg
            print(f"fwd tiles {cfg}: {do_bench(lambda: triton_path(None)) * 1e3:.0f} us")
        ct.FWD_BLOCK_L, ct.FWD_BLOCK_D, ct.FWD_WARPS = base
        for cfg in [(32, 64, 4, 4), (32, 64, 4, 8), (64, 64, 8, 2), (32, 128, 8, 4), (16, 128, 4, 8)]:
            ct.BWD_BLOCK_L, ct.BWD_BLOCK_D, ct.BWD_WARPS, ct.BWD_BLOCKS = cfg
            print(f"bwd tiles {cfg}: fwd+bwd {times(triton_path, None)[1] * 1e3:.0f} us")
        # the split backward: its first kernel's tiles (with time blocks per program), then its second's, then g in
        # bf16; each timed alone and in fwd+bwd, the other settings at their defaults
        knobs = [
            (("SPLIT_BLOCK_L", "SPLIT_BLOCK_D", "SPLIT_WARPS", "SPLIT_BLOCKS"),
             [(32, 64, 8, 1), (32, 64, 4, 1), (16, 64, 4, 1), (16, 128, 8, 1), (64, 64, 8, 1), (32, 64, 8, 2),
              (32, 64, 8, 4)]),
            (("SPLIT_DU_BLOCK_L", "SPLIT_DU_BLOCK_D", "SPLIT_DU_WARPS"),
             [(32, 64, 8), (32, 64, 4), (64, 64, 8), (32, 128, 8), (64, 128, 8)]),
            (("SPLIT_G_FP32",), [(True,), (False,)]),
        ]
        for names, cfgs in knobs:
            base = tuple(getattr(ct, n) for n in names)
            for cfg in cfgs:
                for n, v in zip(names, cfg):
                    setattr(ct, n, v)
                alone, both = with_split(True, bwd_alone, None), with_split(True, times, triton_path, None)[1]
                print(f"split {' '.join(names)} {cfg}: bwd alone {alone * 1e3:.0f} us, fwd+bwd {both * 1e3:.0f} us")
            for n, v in zip(names, base):
                setattr(ct, n, v)


if __name__ == "__main__":
    main()
