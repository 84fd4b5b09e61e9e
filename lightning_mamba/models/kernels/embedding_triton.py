"""The embedding's backward for small vocabularies (the study's byte-level models) in one Triton kernel.

torch's embedding backward sorts the token ids (a radix sort and a segmented sum) whenever a batch holds more than
3,072 tokens: at the study's cells (16,384 tokens, vocabulary 257) that took ~89 us of a ~6.8 ms step on an H100
(docs/performance.md), for a sum of 16,384 rows of grad h into 257 rows. Here each program takes a slice of the
tokens, a block of the vocabulary and a block of the features, and adds its tokens' rows into its vocabulary rows as
one-hot products on the tensor cores: the one-hot matrix is exact in bf16, and each fp32 gradient enters as the sum
of three bf16 pieces (8 significant bits each), so every product is exact and only the fp32 sums round, as any sum
does. Each program writes its own partial rows (no atomics: the result does not depend on the order programs run),
summed after. Same values as torch's to rounding (another order of the same sums).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import last_dim_contiguous

try:  # CI machines have no triton: the module must still import
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_VOCAB = 1024  # larger vocabularies keep torch's backward (the one-hot work grows with the vocabulary)
BLOCK_T, BLOCK_V, BLOCK_D = 64, 64, 64  # tokens per step of a program's loop; vocabulary rows; features
TOKENS_PER_PROGRAM = 512  # a program's slice of the tokens (at least): 32 partial sums at 16,384 tokens
MAX_PARTS = 32  # at most this many partial sums (parts x vocabulary x d fp32: 8.4 MB at the study's cells); larger
# batches give each program more tokens, a power of two (one compile per size)


def supports(weight: Tensor) -> bool:
    """Whether :func:`embedding` takes our backward for this weight (a vocabulary of at most MAX_VOCAB rows)."""
    return triton is not None and weight.size(0) <= MAX_VOCAB


if triton is not None:

    @triton.jit
    def _split3(g):
        """g (fp32) as three bf16 pieces whose fp32 sum is g."""
        hi = g.to(tl.bfloat16)
        rest = g - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        return hi, mid, lo

    @triton.jit
    def _add_rows(acc, match, g, HALF_DOT: tl.constexpr):
        """acc + onehot @ g, onehot the (vocabulary, tokens) matches: on the tensor cores, g as three bf16 pieces; or
        (HALF_DOT off: Triton's CPU interpreter, whose bf16 casts and products work on bit patterns) one product in
        full fp32 precision. Every product is exact either way."""
        if HALF_DOT:
            onehot = match.to(tl.bfloat16)
            hi, mid, lo = _split3(g)
            acc = tl.dot(onehot, hi, acc)
            acc = tl.dot(onehot, mid, acc)
            return tl.dot(onehot, lo, acc)
        return tl.dot(tl.where(match, 1.0, 0.0), g, acc, input_precision="ieee")

    @triton.jit
    def _embedding_bwd_kernel(ids_ptr, grad_ptr, part_ptr, n_tokens, vocab, dim, stride_grad, stride_part,
                              TOKENS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                              BLOCK_D: tl.constexpr, HALF_DOT: tl.constexpr):
        split, pid_v, pid_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
        for start in range(0, TOKENS, BLOCK_T):
            tokens = split * TOKENS + start + tl.arange(0, BLOCK_T)
            live = tokens < n_tokens
            ids = tl.load(ids_ptr + tokens, mask=live, other=-1)
            g = tl.load(grad_ptr + tokens[:, None].to(tl.int64) * stride_grad + cols[None, :],
                        mask=live[:, None] & (cols[None, :] < dim), other=0.0).to(tl.float32)
            acc = _add_rows(acc, rows_v[:, None] == ids[None, :], g, HALF_DOT)
        out = part_ptr + split.to(tl.int64) * stride_part + rows_v[:, None] * dim + cols[None, :]
        tl.store(out, acc, mask=(rows_v[:, None] < vocab) & (cols[None, :] < dim))


def embedding_backward(ids: Tensor, grad: Tensor, vocab: int) -> Tensor:
    """grad weight (vocab, d) in fp32 of an embedding lookup: the rows of ``grad`` (..., d) summed by ``ids`` (...)."""
    d = grad.size(-1)
    ids, grad = ids.reshape(-1).contiguous(), last_dim_contiguous(grad.reshape(-1, d))
    n = ids.numel()
    tokens = max(TOKENS_PER_PROGRAM, triton.next_power_of_2(triton.cdiv(n, MAX_PARTS)))
    splits = max(1, triton.cdiv(n, tokens))
    parts = torch.empty(splits, vocab, d, device=grad.device, dtype=torch.float32)
    grid = (splits, triton.cdiv(vocab, BLOCK_V), triton.cdiv(d, BLOCK_D))
    _embedding_bwd_kernel[grid](ids, grad, parts, n, vocab, d, grad.stride(0), parts.stride(0),
                                TOKENS=tokens, BLOCK_T=BLOCK_T, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D,
                                HALF_DOT=grad.is_cuda)
    return parts.sum(0) if splits > 1 else parts[0]


class _Embedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.vocab = weight.size(0)
        ctx.dtype = weight.dtype
        return torch.nn.functional.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (ids,) = ctx.saved_tensors
        return None, embedding_backward(ids, grad, ctx.vocab).to(ctx.dtype)


def embedding(ids: Tensor, weight: Tensor) -> Tensor:
    """F.embedding(ids, weight) whose backward is :func:`embedding_backward` (call where :func:`supports`)."""
    return _Embedding.apply(ids, weight)
