"""Autograd keeps no copy of one tensor: a backward that saved it (or a view of it) gets it recomputed.

Used for in_proj's input, the residual add + RMSNorm's output: in_proj saves it for its weight gradient, 2 bytes per
token and d_model a layer (130m at 16 x 2048: ~50 MB a layer, ~1.2 GB a step), while the norm already keeps the fp32
residual it came from; one norm pass in the backward makes it again (backend.recompute_norm_output).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor


class _Layout(NamedTuple):
    """Where a saved view lay in the tensor's storage, relative to the tensor's own offset."""

    size: torch.Size
    stride: tuple[int, ...]
    offset: int


@contextlib.contextmanager
def saved_as_recomputed(t: Tensor, make: Callable[[], Tensor]) -> Iterator[None]:
    """Inside the block, whatever autograd saves of ``t`` (t or a view of it, in t's dtype) is kept as its layout
    only, and the backward that unpacks it gets it from ``make()``: a new tensor with t's values, shape and
    contiguous layout (bitwise t's values, for the same gradients). Other saved tensors are kept as usual. t must stay
    alive until the block ends (so no other tensor takes its memory meanwhile); after it, nothing autograd holds keeps
    it (the hooks hold neither t nor its storage)."""
    ptr, dtype, base = t.untyped_storage().data_ptr(), t.dtype, t.storage_offset()
    assert t.is_contiguous(), "make() rebuilds t contiguous"

    def pack(x: Tensor):
        if x.dtype == dtype and x.untyped_storage().data_ptr() == ptr:
            return _Layout(x.size(), x.stride(), x.storage_offset() - base)
        return x

    def unpack(x):
        if isinstance(x, _Layout):
            return make().as_strided(x.size, x.stride, x.offset)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
