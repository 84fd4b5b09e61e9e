"""The fused Triton causal conv1d + SiLU (models/kernels/conv_triton.py) against the torch path it replaces (GPU).

    python benchmarks/conv_kernel.py                 # the 130M model's conv: b 16, l 2048, d 1792, k 4, bf16
    python benchmarks/conv_kernel.py --sweep         # also try other tile sizes

Times forward and forward + backward (grads of u, weight, bias) with triton.testing.do_bench, u laid out as in
the model (a column slice of in_proj's output), and prints the ratio torch / triton; with and without seq_idx;
and the triton backward alone (conv_triton._backward).
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

    from lightning_mamba.models.conv import causal_conv1d
    from lightning_mamba.models.kernels import conv_triton as ct

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

    print(f"# b {b}, l {l}, d {d} (row stride {width}), k {k}, bf16, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for s, name in ((None, "no seq_idx"), (seq_idx, "seq_idx")):
        (tf, tb), (rf, rb) = times(torch_path, s), times(triton_path, s)
        print(f"{name:>10}: torch fwd {tf * 1e3:7.0f} us, fwd+bwd {tb * 1e3:7.0f} us | triton fwd {rf * 1e3:7.0f} us, "
              f"fwd+bwd {rb * 1e3:7.0f} us (bwd alone {bwd_alone(s) * 1e3:.0f} us) | ratio torch/triton fwd "
              f"{tf / rf:.2f}, fwd+bwd {tb / rb:.2f}")
    if args.sweep:
        base = ct.FWD_BLOCK_L, ct.FWD_BLOCK_D, ct.FWD_WARPS
        for cfg in [(64, 128, 8), (32, 128, 4), (32, 64, 4), (128, 64, 8)]:
            ct.FWD_BLOCK_L, ct.FWD_BLOCK_D, ct.FWD_WARPS = cfg
            print(f"fwd tiles {cfg}: {do_bench(lambda: triton_path(None)) * 1e3:.0f} us")
        ct.FWD_BLOCK_L, ct.FWD_BLOCK_D, ct.FWD_WARPS = base
        base = ct.BWD_BLOCK_L, ct.BWD_BLOCK_D, ct.BWD_WARPS, ct.BWD_BLOCKS
        for cfg in [(32, 64, 4, 4), (32, 64, 4, 8), (64, 64, 8, 2), (32, 128, 8, 4), (16, 128, 4, 8)]:
            ct.BWD_BLOCK_L, ct.BWD_BLOCK_D, ct.BWD_WARPS, ct.BWD_BLOCKS = cfg
            print(f"bwd tiles {cfg}: fwd+bwd {times(triton_path, None)[1] * 1e3:.0f} us")
        ct.BWD_BLOCK_L, ct.BWD_BLOCK_D, ct.BWD_WARPS, ct.BWD_BLOCKS = base


if __name__ == "__main__":
    main()
