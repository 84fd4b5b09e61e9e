"""One recorder of the aten ops a piece of code runs, for tests that count what a step computes or copies."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def tensors(tree) -> list[torch.Tensor]:
    """The tensors in an op's (nested) arguments or outputs."""
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def copy_destinations(fn: Callable) -> list[tuple[int, ...]]:
    """Runs ``fn()`` and returns the shape of every aten.copy_ destination on the way, in order (what a split's
    backward copied in, for the tests of models/kernels/grad_slots.py's in-place gradients)."""
    shapes = []
    with OpWatch(lambda func, args, out: shapes.append(tuple(args[0].shape))
                 if func is torch.ops.aten.copy_.default else None):
        fn()
    return shapes


class OpWatch(TorchDispatchMode):
    """Runs every op as usual and hands ``see(func, args, out)`` each one (args: its positional arguments)."""

    def __init__(self, see: Callable):
        super().__init__()
        self.see = see

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.see(func, args, out)
        return out
