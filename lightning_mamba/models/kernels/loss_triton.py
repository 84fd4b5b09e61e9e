"""Cross-entropy of a chunk of logits and its gradient in one Triton kernel, in place.

The torch form of a chunk in models/loss.py (upcast to fp32, logsumexp, gather, then softmax - onehot as three
in-place passes and a downcast) moves ~46 bytes per logit; at the official 130M size that is ~76 GB per training
step, ~10% of it on an H200. Here one program per row reads the row once for its running max and sum of exp
(online softmax, fp32), then reads it again (from L2) and overwrites it with the gradient of the row's loss,
softmax - onehot(label), in the logits' own dtype: ~6 bytes per logit. Ignored rows (label -100) get loss 0 and a
zero gradient. Same math as the torch form, which rounds the gradient to the matmul dtype too.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # CI machines have no triton: the module must still import
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK_V, WARPS = 4096, 8  # vocabulary columns per step of a row's loop
# Pass 1 either takes a max and a sum across the block at every step ("block": two barriers a step; what the H200
# figures in docs/performance.md ran) or keeps a running max and sum per lane of the block and reduces them once,
# at the row's end ("lanes": one exp per element, exp(-|x - m|) serving both the rescale and the new term; not yet
# timed on a GPU: benchmarks/cross_entropy.py prints both).
PASS1 = "block"
PASS1_CHOICES = ("lanes", "block")
# The vocabulary size is a compile-time constant (one compile per model; static loop bounds, which Triton's CPU
# interpreter also needs under numpy >= 2.4).


def available() -> bool:
    """True when triton imports and CUDA is available."""
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _xent_kernel(
        logits_ptr, labels_ptr, loss_ptr, row_stride, ignore_index,
        V: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr, LANES: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        ptr = logits_ptr + row * row_stride
        label = tl.load(labels_ptr + row)
        # pass 1: lse = m + log(s), the running max m and the sum s of exp(x - m)
        if LANES:
            m_lane = tl.full([BLOCK], float("-inf"), tl.float32)
            s_lane = tl.zeros([BLOCK], tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                d = x - m_lane
                e = tl.exp(-tl.abs(d))  # exp(m - x) where x is the new max, else exp(x - m)
                s_lane = tl.where(d > 0, s_lane * e + 1.0, s_lane + e)
                m_lane = tl.maximum(m_lane, x)
            m = tl.max(m_lane, axis=0)
            # lanes past the vocabulary's end saw only -inf (their s is nan): they add nothing
            s = tl.sum(tl.where(m_lane == float("-inf"), 0.0, s_lane * tl.exp(m_lane - m)), axis=0)
        else:
            m = float("-inf")
            s = 0.0
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, axis=0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
                m = m_new
        lse = m + tl.log(s)
        valid = label != ignore_index
        target = tl.where(valid, label, 0)
        x_target = tl.load(ptr + target).to(tl.float32)  # before pass 2 overwrites the row
        tl.store(loss_ptr + row, tl.where(valid, lse - x_target, 0.0))
        if WRITE_GRAD:
            # pass 2: the row becomes d loss_row / d logits = softmax - onehot(target) (0 on an ignored row)
            keep = valid.to(tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
                g = (tl.exp(x - lse) - (cols == target).to(tl.float32)) * keep
                tl.store(ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < V)


def cross_entropy_rows_(logits: Tensor, labels: Tensor, write_grad: bool, ignore_index: int = -100) -> Tensor:
    """Per-row cross-entropy (fp32, 0 where ``labels`` is ``ignore_index``) of ``logits`` (rows, V; fp32, fp16 or
    bf16; last dimension contiguous) against ``labels`` (rows,); with ``write_grad``, ``logits`` is overwritten by
    the gradient of each row's loss. Labels must lie in [0, V) or equal ``ignore_index`` (not checked: a check
    would synchronise with the GPU)."""
    if logits.dim() != 2 or logits.stride(1) != 1 or labels.shape != logits.shape[:1]:
        raise ValueError(f"need logits (rows, V) with contiguous rows and labels (rows,); got {tuple(logits.shape)}, "
                         f"stride {logits.stride()}, labels {tuple(labels.shape)}")
    loss = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
    if logits.size(0):
        _xent_kernel[(logits.size(0),)](
            logits, labels.contiguous(), loss, logits.stride(0), ignore_index,
            V=logits.size(1), WRITE_GRAD=write_grad, BLOCK=BLOCK_V, LANES=PASS1 == "lanes", num_warps=WARPS,
        )
    return loss
