"""The training loss's forward and backward captured as one CUDA graph, replayed every step.

At the 130M size a training step on an H200 is bound by the host CPU: enqueueing its ~1,000 kernels (Python,
autograd, Triton launches with dozens of arguments) takes as long as the GPU takes to run them
(`benchmarks/step_timeline.py`, docs/performance.md). A CUDA graph enqueues all of them in one launch. The first
call runs warm-up iterations on a side stream (Triton compiles and autotunes there), then captures the loss and
``torch.autograd.grad`` of it with respect to the parameters: the gradients land in buffers of the graph's memory
pool, which every replay overwrites. A replay runs the forward and the backward at once; the returned loss's
``backward()`` then only hands those buffers to the parameters (``p.grad`` becomes the buffer, or the buffer is
added to a gradient already there) and scales them by the incoming gradient. So a graphed step costs the host
one replay, not an autograd pass: ``torch.cuda.make_graphed_callables`` (two graphs, the backward replayed from
autograd, which then accumulates every parameter's gradient) cost the study's small cells ~1.2 ms of host time a
step, more than the GPU needed for the whole step (docs/performance.md).

Limits: one batch shape per graph (a batch of another shape or dtype, such as a short last batch, runs eagerly),
zero initial states, one device (no DDP/FSDP), no fp16 autocast (its loss scaling would enter the backward: such
calls run eagerly), gradients set to None between steps (as ``zero_grad`` does by default) and no gradient
accumulation across replays (a parameter's .grad is the graph's buffer, overwritten by the next replay); the capture
holds the step's activations in a private memory pool for the rest of the run.

The capture runs in CUDA's "thread_local" mode, not torch's default "global": under "global" a CUDA call from any
other thread invalidates the capture, and a DataLoader with ``pin_memory=True`` keeps a thread that allocates and
queries pinned host memory while the first batch's capture runs (cudaErrorStreamCaptureInvalidated, at random).
That thread never touches the captured stream, so its calls have no place in the graph either way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models import MambaLM
from ..models.precision import autocast_dtype


def _signature(args: tuple[Tensor, ...]) -> tuple:
    return tuple((a.shape, a.dtype, a.device) for a in args), autocast_dtype("cuda")  # None: autocast off


def _laid_out_like(p: Tensor, g: Tensor) -> Tensor:
    """g in p's strides and dtype (a copy, inside the graph, where they differ), as autograd's accumulation leaves a
    gradient: fused optimizers refuse a gradient laid out otherwise than its parameter."""
    if g.stride() == p.stride() and g.dtype == p.dtype:
        return g
    return torch.empty_like(p).copy_(g)


class _ReplayedLoss(torch.autograd.Function):
    """The replayed loss, made differentiable: its backward hands the replay's gradients to the parameters."""

    @staticmethod
    def forward(ctx, loss: Tensor, anchor: Tensor, graphed: GraphedLoss) -> Tensor:
        ctx.graphed = graphed
        return loss.clone()  # the graph's output is rewritten by the next replay

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.graphed._hand_gradients(grad)
        return None, None, None


class GraphedLoss:
    """``GraphedLoss(model)(input_ids, labels, seq_idx=None)`` equals ``model.loss(...)[0]`` with its gradients;
    the first call captures the graph, later calls with inputs of the same shapes replay it."""

    def __init__(self, model: MambaLM, warmup_iters: int = 3):
        self.model = model
        self.warmup_iters = warmup_iters
        self.signature = None
        self.replays = 0  # steps that ran from the graph (for tests and logs)
        self.replayed_last = False  # whether the last call replayed the graph (else it ran eagerly)
        self._graph: torch.cuda.CUDAGraph | None = None

    def _loss(self, input_ids: Tensor, labels: Tensor, seq_idx: Tensor | None = None) -> Tensor:
        return self.model.loss(input_ids, labels, seq_idx=seq_idx, return_state=False)[0]

    def __call__(self, input_ids: Tensor, labels: Tensor, seq_idx: Tensor | None = None) -> Tensor:
        args = (input_ids, labels) if seq_idx is None else (input_ids, labels, seq_idx)
        self.replayed_last = False
        if not input_ids.is_cuda or not torch.is_grad_enabled() or autocast_dtype("cuda") == torch.float16:
            return self._loss(*args)
        signature = _signature(args)
        if self._graph is None:  # (autocast must run with cache_enabled=False, as Lightning's does)
            self._capture(args)
            self.signature = signature
        if signature != self.signature:
            return self._loss(*args)
        for static, a in zip(self._inputs, args):
            static.copy_(a)
        self._graph.replay()
        self.replays += 1
        self.replayed_last = True
        return _ReplayedLoss.apply(self._static_loss, self._anchor, self)

    def _capture(self, args: tuple[Tensor, ...]) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        self._inputs = tuple(a.detach().clone() for a in args)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as torch's recipe does
            for _ in range(self.warmup_iters):
                torch.autograd.grad(self._loss(*self._inputs), params, allow_unused=True)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # module docstring
            loss = self._loss(*self._inputs)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [None if g is None else _laid_out_like(p, g) for p, g in zip(params, grads)]
        self._graph, self._static_loss = graph, loss.detach()
        self._grads = [(p, g) for p, g in zip(params, grads) if g is not None]  # unused: no gradient, as eager
        self._buffers = [g for _, g in self._grads]  # the same, as one list for each step's foreach
        self._anchor = torch.zeros((), device=loss.device, requires_grad=True)  # makes the replayed loss need grad

    @torch.no_grad()
    def _hand_gradients(self, grad: Tensor) -> None:
        """The last replay's gradients, times ``grad`` (d output / d loss: 1 for ``loss.backward()``), as autograd
        would leave them: a parameter without a gradient gets the buffer itself, one with a gradient gets it added."""
        torch._foreach_mul_(self._buffers, grad)
        for p, g in self._grads:
            if p.grad is None:
                p.grad = g
            elif p.grad is not g:
                p.grad.add_(g)

    def holds_gradients(self) -> bool:
        """Whether every parameter's gradient is this graph's buffer (after a replay's backward with the gradients
        set to None before it): what a graph reading them, :class:`GraphedUpdate`, needs."""
        return self._graph is not None and all(p.grad is g for p, g in self._grads)


class GraphedUpdate:
    """What follows the loss graph's backward in a training step, as a second CUDA graph: the total gradient norm,
    the check that the loss and that norm are finite (a non-finite step sets the fused AdamW's ``found_inf``, which
    skips it on the device, as the NaN guard's deferred check does), norm clipping to ``clip_val`` (None or 0: none)
    and the fused AdamW update. On a GPU a step of the study's small cells costs the host more time in these eager
    parts (~1.5 ms: a dozen launches and Python in each) than the GPU needs for the whole step; as a replay they
    cost one launch.

    Captured at the first step where :meth:`ready` holds: the loss graph replayed and holds every gradient, and the
    optimizer (fused, one device) has its state (so one eager step comes first). The optimizer is captured with its
    groups ``capturable`` and each lr in a device tensor (a Python float would be frozen into the graph), then its
    groups are put back as they were: the lr schedule, the lr monitor and checkpoints keep seeing floats, and each
    replay first copies the groups' lr into those tensors. After a replay, ``norm`` and ``bad`` hold that step's
    total norm (before clipping) and verdict."""

    def __init__(self, graphed_loss: GraphedLoss, clip_val: float | None):
        self.graphed_loss = graphed_loss
        self.clip_val = clip_val or None
        self.replays = 0
        self.norm: Tensor | None = None
        self.bad: Tensor | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._lrs: list[Tensor] = []  # each group's lr as the graph reads it

    def ready(self, optimizer: torch.optim.Optimizer) -> bool:
        if optimizer is not self._optimizer:  # another fit's optimizer: the graph steps the one it captured
            self._graph = self._optimizer = None
        if not (self.graphed_loss.replayed_last and self.graphed_loss.holds_gradients()):
            return False
        return self._graph is not None or all(optimizer.state.get(p) for p, _ in self.graphed_loss._grads)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """This step's update (capturing the graph first, the first time)."""
        if self._graph is None:
            self._capture(optimizer)
        for group, lr in zip(optimizer.param_groups, self._lrs):
            lr.fill_(group["lr"])  # this step's lr, as the schedule set it
        self._graph.replay()
        self.replays += 1

    def _capture(self, optimizer: torch.optim.Optimizer) -> None:
        grads = self.graphed_loss._buffers
        groups = optimizer.param_groups
        saved = [(group["lr"], group.get("capturable", False)) for group in groups]
        self._lrs = [torch.tensor(float(lr), dtype=torch.float32, device=grads[0].device) for lr, _ in saved]
        for group, lr in zip(groups, self._lrs):
            group["lr"], group["capturable"] = lr, True
        try:
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                norm = torch.nn.utils.get_total_norm(grads)
                bad = ~(self.graphed_loss._static_loss.isfinite() & norm.isfinite())
                optimizer.found_inf = bad.float()
                if self.clip_val is not None:  # p.grad is the buffer (ready() checked), as eager clipping finds it
                    torch.nn.utils.clip_grads_with_norm_([p for p, _ in self.graphed_loss._grads], self.clip_val, norm)
                optimizer.step()
        finally:
            for group, (lr, capturable) in zip(groups, saved):
                group["lr"], group["capturable"] = lr, capturable
            if hasattr(optimizer, "found_inf"):  # an eager step must not read this graph's verdict
                del optimizer.found_inf
        self._graph, self._optimizer, self.norm, self.bad = graph, optimizer, norm, bad

