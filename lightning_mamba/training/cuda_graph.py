"""The training loss's forward and backward captured as CUDA graphs, replayed every step.

At the 130M size a training step on an H200 is bound by the host CPU: enqueueing its ~1,000 kernels (Python,
autograd, Triton launches with dozens of arguments) takes as long as the GPU takes to run them
(`benchmarks/step_timeline.py`, docs/performance.md). A CUDA graph enqueues all of a forward's or a backward's
kernels in one launch. ``torch.cuda.make_graphed_callables`` captures them once, after warm-up iterations (which
also let Triton compile and autotune), and replays them with the next batch copied into the captured input
tensors; parameters are read in place, so optimizer updates between replays are seen.

Limits: one batch shape per graph (a batch of another shape or dtype, such as a short last batch, runs eagerly),
zero initial states, one device (no DDP/FSDP), gradients set to None between steps (as ``zero_grad`` does by
default) and no gradient accumulation (a parameter's .grad may alias the graph's static gradient buffer); the
capture holds the step's activations in a private memory pool for the rest of the run.

The capture runs in CUDA's "thread_local" mode, not torch's default "global": under "global" a CUDA call from any
other thread invalidates the capture, and a DataLoader with ``pin_memory=True`` keeps a thread that allocates and
queries pinned host memory while the first batch's capture runs (cudaErrorStreamCaptureInvalidated, at random).
That thread never touches the captured stream, so its calls have no place in the graph either way.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ..models import MambaLM
from ..models.precision import autocast_dtype


class _Loss(nn.Module):
    """model.loss as a module of tensors only (what make_graphed_callables takes); seq_idx optional."""

    def __init__(self, model: MambaLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, labels: Tensor, seq_idx: Tensor | None = None) -> Tensor:
        return self.model.loss(input_ids, labels, seq_idx=seq_idx, return_state=False)[0]


class _ThreadLocalGraph(torch.cuda.graph):
    """torch.cuda.graph that always captures in "thread_local" mode (module docstring)."""

    def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode="thread_local", **kwargs):
        super().__init__(cuda_graph, pool=pool, stream=stream, capture_error_mode="thread_local", **kwargs)


@contextlib.contextmanager
def thread_local_capture():
    """While open, ``torch.cuda.graph`` (which make_graphed_callables calls for its captures and exposes no mode
    for) is _ThreadLocalGraph."""
    original = torch.cuda.graph
    torch.cuda.graph = _ThreadLocalGraph
    try:
        yield
    finally:
        torch.cuda.graph = original


def _signature(args: tuple[Tensor, ...]) -> tuple:
    return tuple((a.shape, a.dtype, a.device) for a in args), autocast_dtype("cuda")  # None: autocast off


class GraphedLoss:
    """``GraphedLoss(model)(input_ids, labels, seq_idx=None)`` equals ``model.loss(...)[0]`` with its gradients;
    the first call captures the graphs, later calls with inputs of the same shapes replay them."""

    def __init__(self, model: MambaLM, warmup_iters: int = 3):
        self.model = model
        self.warmup_iters = warmup_iters
        self.signature = None
        self._graphed: nn.Module | None = None
        self.replays = 0  # steps that ran from the graphs (for tests and logs)

    def __call__(self, input_ids: Tensor, labels: Tensor, seq_idx: Tensor | None = None) -> Tensor:
        args = (input_ids, labels) if seq_idx is None else (input_ids, labels, seq_idx)
        if not input_ids.is_cuda or not torch.is_grad_enabled():
            return self.model.loss(input_ids, labels, seq_idx=seq_idx, return_state=False)[0]
        signature = _signature(args)
        if self._graphed is None:  # (autocast must run with cache_enabled=False, as Lightning's does)
            with thread_local_capture():
                self._graphed = torch.cuda.make_graphed_callables(
                    _Loss(self.model), tuple(a.detach().clone() for a in args),
                    num_warmup_iters=self.warmup_iters, allow_unused_input=True,
                )
            self.signature = signature
        if signature != self.signature:
            return self.model.loss(input_ids, labels, seq_idx=seq_idx, return_state=False)[0]
        self.replays += 1
        return self._graphed(*args)
