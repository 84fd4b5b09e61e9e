"""RMSNorm and the gated RMSNorm of Mamba-2 (computed in fp32 or wider, cast back)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        ct = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(ct)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(ct)).to(x.dtype)


class RMSNormGated(nn.Module):
    """norm_before_gate=False: normalise y * silu(z), per group of ``group_size`` channels."""

    def __init__(self, d: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        ct = torch.promote_types(x.dtype, torch.float32)
        v = x.to(ct) * F.silu(z.to(ct))
        shape = v.shape
        v = v.view(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + self.eps)
        return (v.view(shape) * self.weight.to(ct)).to(x.dtype)
