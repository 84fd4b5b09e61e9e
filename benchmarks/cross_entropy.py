"""The training loss's output layer + cross-entropy, three ways, forward + backward (GPU).

    python benchmarks/cross_entropy.py               # the 130M model's: 16 x 2048 tokens, d_model 768, vocab 50280, bf16
    python benchmarks/cross_entropy.py --sweep       # also other kernel blocks / warps and chunk sizes

(a) the baseline, what the bare mamba_ssm loop in train_throughput.py does: lm_head in bf16, then
    F.cross_entropy on the fp32 upcast of the whole logits tensor;
(b) models/loss.py's chunked linear cross-entropy with torch ops per chunk (fused=False);
(c) the same with the Triton kernel per chunk (fused=True, models/kernels/loss_triton.py), what training on CUDA uses,
    and again with the kernel's other first pass (loss_triton.PASS1_CHOICES).
Prints ms (triton.testing.do_bench), peak memory above the inputs, and the ratio baseline / each.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16 * 2048)
    p.add_argument("--d_model", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50280)
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("cross_entropy.py times CUDA kernels: run it on a machine with a GPU")
    from triton.testing import do_bench

    from lightning_mamba.models import loss as lm_loss
    from lightning_mamba.models.kernels import loss_triton

    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, args.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(args.vocab, args.d_model, device="cuda") * 0.02).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens,), device="cuda")

    def baseline():
        logits = F.linear(hidden, weight.to(torch.bfloat16))
        return F.cross_entropy(logits.float(), labels)

    def chunked(fused, rows=None):
        return lambda: lm_loss.linear_cross_entropy(hidden, weight, labels, rows, fused=fused)

    def measure(fn):
        step = lambda: torch.autograd.grad(fn(), [hidden, weight])  # noqa: E731
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        return do_bench(step), peak

    print(f"# {args.tokens} tokens, d_model {args.d_model}, vocab {args.vocab}, bf16, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}")
    ref, ref_mem = measure(baseline)
    print(f"(a) baseline lm_head + F.cross_entropy(fp32): {ref:7.2f} ms, peak {ref_mem:5.2f} GiB")
    for name, fn in (("(b) chunked, torch ops", chunked(False)), ("(c) chunked, Triton kernel", chunked(True))):
        ms, mem = measure(fn)
        print(f"{name:<44}: {ms:7.2f} ms, peak {mem:5.2f} GiB | ratio baseline/this {ref / ms:.2f}")
    default_pass1 = loss_triton.PASS1
    for pass1 in (c for c in loss_triton.PASS1_CHOICES if c != default_pass1):  # the kernel's other first pass
        loss_triton.PASS1 = pass1
        ms, mem = measure(chunked(True))
        print(f"{'(c) with pass 1 ' + repr(pass1):<44}: {ms:7.2f} ms, peak {mem:5.2f} GiB | ratio baseline/this "
              f"{ref / ms:.2f}")
    loss_triton.PASS1 = default_pass1
    if args.sweep:
        base = loss_triton.BLOCK_V, loss_triton.WARPS
        for cfg in [(1024, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16), (16384, 32)]:
            loss_triton.BLOCK_V, loss_triton.WARPS = cfg
            print(f"kernel BLOCK_V {cfg[0]}, warps {cfg[1]}: {measure(chunked(True))[0]:.2f} ms")
        loss_triton.BLOCK_V, loss_triton.WARPS = base
        for rows in (2048, 4096, 8192, 16384, args.tokens):
            ms, mem = measure(chunked(True, rows))
            print(f"chunk rows {rows}: {ms:.2f} ms, peak {mem:.2f} GiB")


if __name__ == "__main__":
    main()
