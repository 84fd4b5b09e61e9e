"""The total gradient norm and norm clipping, as torch.nn.utils computes them, without its per-call regrouping.

``torch.nn.utils.get_total_norm`` and ``clip_grads_with_norm_`` sort the tensors by device and dtype on every call;
a model on one device in one dtype (every single-GPU run here) is one group, so the same kernels can be launched
directly. On the study's small cells, where a CUDA-graphed step leaves the host's time per step as the bound, this
saves a good part of the two calls' host time (docs/performance.md). Other cases go to torch's functions. Same
operations in the same order, so the same bits."""

from __future__ import annotations

import torch
from torch import Tensor


def _one_group(grads: list[Tensor]) -> bool:
    first = grads[0]
    return all(g.device == first.device and g.dtype == first.dtype and not g.is_sparse for g in grads)


def total_norm(grads: list[Tensor]) -> Tensor:
    """The 2-norm of all of ``grads`` together (torch.nn.utils.get_total_norm(grads))."""
    if not grads or not _one_group(grads):
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)


def clip_with_norm_(grads: list[Tensor], max_norm: float, norm: Tensor) -> None:
    """Scale ``grads`` in place by min(1, max_norm / (norm + 1e-6)) (torch.nn.utils.clip_grads_with_norm_)."""
    if not grads:
        return
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    if not _one_group(grads):
        for g in grads:
            g.mul_(coef.to(g.device))
        return
    torch._foreach_mul_(grads, coef.to(grads[0].device))
