"""Next-token cross-entropy fused with the output layer, computed in row chunks: never the whole logits tensor.

At the official 130M size a batch of 16 x 2048 tokens has 33M x 50K logits: 3.3 GB in bf16 and 6.6 GB more for
the fp32 copy the loss is computed from, plus their gradients. Here each chunk of rows gets its logits, its
loss and, when a gradient is wanted, its gradients with respect to the hidden states and the output weight
right away (the chunk's logits are then dropped); backward only scales the stored gradients. Same math as
``F.cross_entropy((h @ W.T).float(), labels)`` with the matmul in the autocast dtype when autocast is on. With
``fused`` (the Triton backend) each chunk's loss and gradient come from one kernel that overwrites the chunk's
logits with their gradient (models/kernels/loss_triton.py) instead of five torch passes over an fp32 copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import loss_triton
from .precision import HALF_DTYPES, autocast_dtype

IGNORE_INDEX = -100
CHUNK_BYTES = 2**30  # fp32 logits per chunk: 1 GiB


FP32_ADDMM: bool | None = None  # whether this torch's CUDA addmm takes half inputs into an fp32 out; None: not tried


def _add_product_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b. For half a, b and an fp32 acc on CUDA the GEMM adds its fp32 accumulators into acc itself
    (`addmm(..., out_dtype=float32)`: one kernel, no half copy of the product written, read back and rounded);
    elsewhere, and on a torch without that, the product in a's dtype, then an add."""
    global FP32_ADDMM
    if acc.is_cuda and acc.dtype == torch.float32 and a.dtype in HALF_DTYPES and FP32_ADDMM is not False:
        try:
            with torch.autocast("cuda", enabled=False):  # (autocast would cast acc to a's dtype)
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            FP32_ADDMM = True
            return
        except (RuntimeError, TypeError):  # torch < 2.9 has no out_dtype; some releases want acc in a's dtype
            if FP32_ADDMM:
                raise
            FP32_ADDMM = False
    acc += a @ b


def _matmul_dtype(h: Tensor) -> torch.dtype:
    """The dtype nn.Linear would compute in here (autocast's, when it is on)."""
    return autocast_dtype(h.device.type) or h.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk_rows: int, fused: bool) -> Tensor:
        dtype = _matmul_dtype(hidden)
        acc = torch.promote_types(dtype, torch.float32)  # the loss's dtype: fp32 (fp64 in exactness tests)
        w = weight.to(dtype)
        valid = labels != IGNORE_INDEX
        n_valid = valid.sum()
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_grad else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, y = hidden[rows].to(dtype), labels[rows]
            if fused:  # the kernel leaves d loss_sum / d logits in the logits' place
                grad = h @ w.t()
                total += loss_triton.cross_entropy_rows_(grad, y, want_grad, IGNORE_INDEX).sum()
            else:
                logits, ok = (h @ w.t()).to(acc), valid[rows]
                target = y.clamp_min(0)[:, None]
                lse = torch.logsumexp(logits, dim=-1)
                total += ((lse - logits.gather(1, target)[:, 0]) * ok).sum()
                if want_grad:
                    # d loss_sum / d logits = softmax - onehot(target) on rows that count; in place: one chunk in memory
                    keep = ok[:, None].to(logits.dtype)
                    grad = logits.sub_(lse[:, None]).exp_().mul_(keep).scatter_add_(1, target, -keep).to(dtype)
            if want_grad:
                grad_hidden[rows] = (grad @ w).to(hidden.dtype)
                _add_product_(grad_weight, grad.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight, n_valid)
        ctx.weight_dtype = weight.dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_hidden, grad_weight, n_valid = ctx.saved_tensors
        scale = grad_loss / n_valid
        dh = None if grad_hidden is None or not ctx.needs_input_grad[0] else grad_hidden * scale.to(grad_hidden.dtype)
        dw = None
        if grad_weight is not None and ctx.needs_input_grad[1]:
            dw = (grad_weight * scale).to(ctx.weight_dtype)
        return dh, dw, None, None, None


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, chunk_rows: int | None = None, fused: bool | None = None
) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` (hidden (..., d), weight (vocab, d)) against ``labels`` (...),
    ignoring label -100, without materialising the logits. ``chunk_rows``: rows per chunk (default: 1 GiB of
    fp32 logits). ``fused``: each chunk's loss and gradient by the Triton kernel (default: on CUDA when triton
    imports; never for fp64)."""
    hidden = hidden.reshape(-1, hidden.size(-1))
    labels = labels.reshape(-1)
    rows = chunk_rows or max(1, CHUNK_BYTES // (4 * weight.size(0)))
    if fused is None:
        fused = hidden.is_cuda and loss_triton.available()
    fused = fused and _matmul_dtype(hidden) in (torch.float32, torch.float16, torch.bfloat16)
    return _LinearCrossEntropy.apply(hidden, weight, labels, rows, fused)
