"""A split whose pieces' gradients land in one buffer, written there by the kernels' backwards that make them.

torch.split's backward concatenates its pieces' gradients. In a 130m training step on an H200 the mixer's two
splits (in_proj's output into z | xBC | dt, the conv's output into x | B | C) cost 4.3 ms of copies a step, of
119.5 ms of GPU work (docs/performance.md); mamba_ssm's fused path has each backward kernel write its gradient into
a slice of one buffer instead. Here :func:`split_last` hands out pieces that carry a slot, their columns of the
split's gradient buffer; a backward that is handed the slot (:func:`slot_of` in forward, :func:`claim` in backward)
writes its gradient there, and the split's backward returns the buffer, copying in only the gradients that arrive
elsewhere (a piece used twice, an intervention's rewrite) and zeroing the columns of pieces that got none.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

_in_place = True


@contextlib.contextmanager
def in_place(on: bool):
    """Inside ``in_place(False)`` :func:`split_last` is torch.split's (its backward concatenates), so a benchmark can
    time both in one process (benchmarks/train_throughput.py's ``lightning_graph_splitcat``)."""
    global _in_place
    before, _in_place = _in_place, bool(on)
    try:
        yield
    finally:
        _in_place = before


class GradBuffer:
    """The gradient of a split tensor, allocated at the first claim of the backward that fills it."""

    def __init__(self, t: Tensor, widths: list[int], shapes: list[tuple[int, ...]]):
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device
        self.starts = [sum(widths[:i]) for i in range(len(widths))]
        self.widths, self.shapes = widths, shapes
        self.buffer: Tensor | None = None
        self.claimed: set[int] = set()

    def piece(self, buffer: Tensor, i: int) -> Tensor:
        """Piece i's columns of ``buffer``, in the piece's shape."""
        cols = buffer.narrow(-1, self.starts[i], self.widths[i])
        return cols.unflatten(-1, self.shapes[i]) if len(self.shapes[i]) > 1 else cols

    def claim(self, i: int, dtype: torch.dtype) -> Tensor | None:
        """Where piece i's gradient goes, for the one backward that asks first (and in the buffer's dtype)."""
        if i in self.claimed or dtype != self.dtype:
            return None
        self.claimed.add(i)
        if self.buffer is None:
            self.buffer = self._new()
        return self.piece(self.buffer, i)

    def take(self) -> Tensor:
        """The buffer for the split's backward (a fresh one if nothing claimed), leaving this ready for another
        backward through the same graph."""
        buffer = self.buffer if self.buffer is not None else self._new()
        self.buffer, self.claimed = None, set()
        return buffer

    def _new(self) -> Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)


def _same_memory(a: Tensor, b: Tensor) -> bool:
    """Whether a and b are the same elements in the same places. The stride of a dimension of size 1 says nothing
    (a view may give it any value: a gradient written into its slot and then viewed as (rows, width) and back, as
    the gated norm's backward does, comes back with other strides there when b x l is 1), so only the others count."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype
            and all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1))


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, grads: GradBuffer):
        ctx.grads = grads
        ctx.set_materialize_grads(False)  # a piece without a gradient arrives as None: its columns are zeroed
        return tuple(grads.piece(t, i) for i in range(len(grads.widths)))

    @staticmethod
    def backward(ctx, *piece_grads):
        grads = ctx.grads
        buffer = grads.take()
        for i, g in enumerate(piece_grads):
            dst = grads.piece(buffer, i)
            if g is None:
                dst.zero_()
            elif not _same_memory(g, dst):  # written elsewhere: copy it in (only these columns)
                dst.copy_(g)
        return buffer, None


def split_last(t: Tensor, sizes: list[int | tuple[int, ...]]) -> tuple[Tensor, ...]:
    """torch.split(t, widths, dim=-1), each piece's last dimension unflattened to its size when that is a tuple
    (``[d_inner, (ngroups, d_state)]``). While grad is on, the pieces carry their slots of one gradient buffer."""
    shapes = [tuple(s) if isinstance(s, (tuple, list)) else (s,) for s in sizes]
    widths = [math.prod(s) for s in shapes]
    if not (_in_place and torch.is_grad_enabled() and t.requires_grad):
        pieces = torch.split(t, widths, dim=-1)
        return tuple(p.unflatten(-1, s) if len(s) > 1 else p for p, s in zip(pieces, shapes))
    grads = GradBuffer(t, widths, shapes)
    pieces = _Split.apply(t, grads)
    for i, p in enumerate(pieces):
        p._grad_slot = (grads, i)
    return pieces


def slot_of(t: Tensor) -> tuple[GradBuffer, int] | None:
    """The slot a piece of :func:`split_last` carries (call in forward, on the piece itself), or None."""
    return getattr(t, "_grad_slot", None)


def claim(slot: tuple[GradBuffer, int] | None, dtype: torch.dtype) -> Tensor | None:
    """In backward: where to write the gradient of the piece whose slot is ``slot`` (in its shape, strided), or None
    (no slot, another backward claimed it first, or a gradient of another dtype): then allocate as usual."""
    return None if slot is None else slot[0].claim(slot[1], dtype)
