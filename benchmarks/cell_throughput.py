"""Throughput of the forgetting study's cells: many optimizer steps of a tiny Mamba-2 LM, eager vs CUDA graphs,
one process vs N processes sharing one GPU (issue [throughput], item 4).

    python benchmarks/cell_throughput.py                                   # GPU: every contender, 8 cells
    python benchmarks/cell_throughput.py --contenders graph_Ncells --cells 8 --states 16,64,256 --lens 32,256,1024
    python benchmarks/cell_throughput.py --device cpu --steps 3 --warmup 1 --d_state 16 --seq_len 32 \\
        --tokens_per_step 512 --vocab 257 --contenders eager_1cell,fit_1cell --fit_source default  # CPU smoke run

The model is the study's 4 x 256 Mamba-2 (headdim 32, expand 2, vocab 8192) trained with its own loss
(``MambaLM.loss``), bf16 autocast on CUDA (cache off, as Lightning's), gradient clipping to 1.0 and AdamW
(lr 2e-3, betas 0.9/0.95, weight decay 0.1 off A_log/dt_bias/D/norms/biases, fused on CUDA), at a fixed number of
tokens per step (batch = tokens_per_step / seq_len). The data already lies on the device: each step draws random
windows of a random token tensor there (randint offsets + one gather), with no host->device copy.

Contenders:
  eager_1cell      one process, the eager step (the baseline: ~30 ms a step on an H200, bound by the host CPU).
  fit_1cell        THE REAL PATH a user trains with: ``lightning-mamba fit --config configs/train.yaml --config
                   configs/experiment/regime.yaml`` run in this process (training/cli.py's lightning_cli) with this
                   run's shape (--d_model, --n_layer, --headdim, --expand, --d_state, --seq_len, --chunk_size,
                   --backend; batch = tokens_per_step / seq_len), --model.cuda_graph true and bf16-mixed on CUDA
                   (false and 32-true on CPU), one device, max_steps = warm-up + timed steps. Its data is the data
                   module's: --fit_source (default ``code``, the byte-level Python source of the installed packages
                   the study trains on; any data.source works), byte tokenizer (vocab 257, not --vocab),
                   random_windows sampling, cached under --fit_cache_dir. Evaluations and checkpoints are off:
                   no validation (limit_val_batches 0), the config's callback list replaced by its training-time
                   callbacks (LearningRateMonitor, TokenThroughputMonitor) plus StepTimer below, so no
                   LengthGeneralization/StateStats/DecayDynamics and no ModelCheckpoint; the TensorBoard logger
                   writes to a temporary folder. StepTimer (a Lightning callback) reads the clock after a
                   synchronize at the end of each window's last batch. Its step is lossgraph_1cell's (graphed loss,
                   eager clipping and fused AdamW); what differs is everything around it: Lightning's loop, the data
                   module (host batches of random windows, copied to the device), the callbacks (the NaN guard, the
                   throughput and lr monitors), the lr schedule and logging. No check against eager ("-").
  lossgraph_1cell  the loss's forward + backward replayed by training/cuda_graph.py's GraphedLoss (what
                   ``--model.cuda_graph true`` trains with); clipping and AdamW stay eager.
  graph_1cell      the whole step (forward, backward, clipping, AdamW with capturable=True and its lr in a device
                   tensor, so a schedule can write it between replays) captured as one CUDA graph and replayed
                   after the next batch is drawn into its static input buffer.
  graph_Ncells     --cells processes (spawn) on the same GPU at once, each running graph_1cell with its own
                   (d_state, seq_len) from --states / --lens (cell i: states[i % len], lens[i % len]).
  eager_Ncells     the same with eager steps (what processes alone buy without graphs); lossgraph_Ncells likewise.
  graph_Nstreams   the same --cells cells in ONE process, each graph_1cell's whole-step graph replayed on its own
                   CUDA stream, one replay per cell per round: processes are time-sliced on the GPU, streams of one
                   process can overlap (small cells leave most of the GPU idle). Per cell: rounds/s.
  <any>_1cell_quadratic  that 1-cell contender with --quadratic_max_len raised to --seq_len: the scan in the SSD's
                   attention form (no padding to a chunk, no state; on CUDA our fused Triton kernels,
                   models/kernels/ssd_quadratic_triton.py, and for rows of 65-1024 tokens ssd_blocked_triton.py),
                   beside the same contender with the chunked scan in the same run (e.g.
                   graph_1cell,graph_1cell_quadratic).
  <any>_1cell_quadratic_torch  the same with the attention form in torch (models/ssd.py ssd_quadratic's einsums):
                   the fused kernels' A/B (e.g. graph_1cell_quadratic_torch,graph_1cell_quadratic).
  <any>_1cell_quadratic_blocked  the same with the 64-token-block kernels (ssd_blocked_triton.py) on rows of 64 or
                   fewer tokens too, which the model gives the one-tile kernels: that A/B (e.g.
                   graph_1cell_quadratic,graph_1cell_quadratic_blocked).
  <any 1cell name>_splitcat  that contender with the mixer's splits as torch.split's (their backward concatenates
                   the pieces' gradients) instead of models/kernels/grad_slots.py's in-place writes: their A/B
                   (e.g. graph_1cell_quadratic,graph_1cell_quadratic_splitcat).
  <any 1cell name>_savestates  that contender with the model's save_chunk_states on: mamba_ssm's chunked scan keeps
                   its forward's per-chunk states for the backward instead of recomputing them (e.g.
                   graph_1cell,graph_1cell_savestates); after or before _splitcat.
  <any 1cell name>_torchembedding  the embedding's backward in torch (it sorts the ids) where the model takes our
                   Triton kernel (a vocabulary of at most 1024 rows): the A/B of models/kernels/embedding_triton.py.
  <any 1cell name>_remadescores  with _savestates: the backward makes the chunked scan's scores C B^T again where the
                   model keeps them from the forward (ssd_chunked_mamba.keeps_cb): that A/B (e.g.
                   graph_1cell_savestates,graph_1cell_savestates_remadescores).
  <any 1cell name>_tritonconv  our Triton conv at every row length, where the model takes causal_conv1d's kernels
                   (when installed) for rows of more than backend.OURS_CONV_MAX_LEN tokens: that A/B (e.g.
                   graph_1cell_quadratic,graph_1cell_quadratic_tritonconv).
  <any 1cell name>_libconv  the other way: causal_conv1d's kernels (when installed) at every row length, where the
                   model takes ours for rows of at most backend.OURS_CONV_MAX_LEN tokens (e.g.
                   graph_1cell_quadratic_libconv,graph_1cell_quadratic at LEN 32).
  fit_1cell_graphupdate  the fit with --model.cuda_graph_update true: the NaN guard's check, clipping and AdamW
                   replayed as a second graph after the loss's (training/cuda_graph.py GraphedUpdate), the A/B of
                   fit_1cell in one process. The modifiers go in any order.

Each graphed contender first checks itself against an eager copy of the model on the same batches (--check_steps
steps from the same weights): the losses must agree and the parameters must have moved alike; a failed check is
printed, marked in the table and makes the exit status 1. Timing: after warm-up (and compilation, capture, check),
--steps steps in windows of --window steps, torch.cuda.synchronize() before each clock read; steps/s is the median
over windows. In the N-cell runs every cell starts timing at one barrier and keeps stepping (untimed) until the
last cell has finished its timed windows, so every timed window runs under the full load. Peak memory is the
allocator's peak per process (the CUDA context, ~0.5 GiB a process, is not in it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import statistics
import sys
import threading
import time
import traceback
import warnings

import lightning as L
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIT_CONFIGS = ("configs/train.yaml", "configs/experiment/regime.yaml")
# The config's callbacks that fit_1cell leaves out: the evaluations (they run at validation or every N steps) and the
# checkpoints. Every other callback of the config stays, since a user's run has it.
FIT_LEFT_OUT = ("ModelCheckpoint", "LengthGeneralizationCallback", "StateStatsCallback", "DecayDynamicsCallback")
if __name__ == "__main__":  # fit_1cell names StepTimer as cell_throughput.StepTimer: this class, not a copy's
    sys.modules.setdefault("cell_throughput", sys.modules[__name__])

CONTENDERS = ("eager_1cell", "fit_1cell", "lossgraph_1cell", "graph_1cell", "eager_Ncells", "lossgraph_Ncells",
              "graph_Ncells", "graph_Nstreams")
GRAPH_KINDS = ("lossgraph", "graph")
TARGET_STEPS_PER_CELL = 150.0  # issue [throughput] item 4: per cell at 16K tokens/step
TARGET_TOTAL_TOKENS = 6e6  # tokens/s over all cells
# The graphed step against an eager copy (bf16): the first step's loss comes from the same weights and batch;
# later losses and the parameters differ only by the order of atomic adds in some backward kernels.
LOSS_RTOL_FIRST, LOSS_RTOL, UPDATE_RTOL = 1e-3, 1e-2, 0.25


# ---- model, optimizer, data --------------------------------------------------------------
def build_model(args, d_state: int, device: str):
    from lightning_mamba.models import MambaConfig, MambaLM

    config = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=args.vocab,
                         ssm_cfg={"layer": "Mamba2", "d_state": d_state, "headdim": args.headdim,
                                  "expand": args.expand, "chunk_size": args.chunk_size,
                                  "quadratic_max_len": args.quadratic_max_len,
                                  "save_chunk_states": args.save_chunk_states})
    return MambaLM(config, backend=args.backend).to(device)


def make_optimizer(model, args, device: str, capturable: bool = False):
    """AdamW with the LightningModule's groups (no decay on A_log, dt_bias, D, norms and biases); fused on CUDA.
    ``capturable``: the step may be captured in a CUDA graph, and each group's lr is a device tensor (a schedule
    writes it in place between replays; a float would be frozen into the graph)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if getattr(p, "_no_weight_decay", False) or p.ndim < 2 else decay).append(p)
    cuda = device == "cuda"
    lr = (lambda: torch.tensor(args.lr, dtype=torch.float32, device=device)) if capturable else (lambda: args.lr)
    groups = [{"params": decay, "weight_decay": args.weight_decay, "lr": lr()},
              {"params": no_decay, "weight_decay": 0.0, "lr": lr()}]
    kwargs = {"capturable": True} if capturable else {}
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=cuda, **kwargs)


def autocast(device: str):
    """bf16 autocast on CUDA with the weight-cast cache off (needed under graph capture; Lightning's choice too);
    fp32 on CPU, as the CPU training runs."""
    if device == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext


class Windows:
    """Random training windows from a random token tensor on the device: ``draw(batch, seq_len, out=None)`` ->
    (batch, seq_len + 1) int64 (input_ids = [:, :-1], labels = [:, 1:]), three kernels, no host copy."""

    def __init__(self, n_tokens: int, vocab: int, device: str, seed: int):
        g = torch.Generator(device=device).manual_seed(seed)
        self.tokens = torch.randint(0, vocab, (n_tokens,), device=device, generator=g)
        self._offsets: dict[int, torch.Tensor] = {}

    def draw(self, batch: int, seq_len: int, out: torch.Tensor | None = None) -> torch.Tensor:
        span = seq_len + 1
        offsets = self._offsets.get(span)
        if offsets is None:
            offsets = self._offsets[span] = torch.arange(span, device=self.tokens.device)
        starts = torch.randint(0, self.tokens.numel() - span + 1, (batch, 1), device=self.tokens.device)
        return torch.take(self.tokens, starts + offsets, out=out)


def train_step(model, opt, params, window, amp, loss_fn=None) -> torch.Tensor:
    """The eager step of benchmarks/train_throughput.py's bare loop: loss under autocast, backward, clip to 1.0,
    AdamW, gradients set to None. ``loss_fn(input_ids, labels)`` defaults to the model's training loss, asked for
    no final state as the training step asks (training/module.py)."""
    ids, labels = window[:, :-1], window[:, 1:]
    with amp():
        loss = model.loss(ids, labels, return_state=False)[0] if loss_fn is None else loss_fn(ids, labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


class StepGraph:
    """The whole training step as one CUDA graph (torch's "whole network capture" recipe): warm-up iterations on a
    side stream (Triton compiles and autotunes there, AdamW creates its state), gradients set to None, then one
    captured step, whose backward allocates the gradients in the graph's pool: from then on ``p.grad`` are static
    buffers that each replay overwrites (never set them to None or zero them between replays). The batch enters
    through ``self.window`` (static); ``self.loss`` is the last replay's loss. The warm-up iterations train the
    model: ``restore`` puts back the weights and the optimizer state of before."""

    def __init__(self, model, opt, params, window: torch.Tensor, amp, warmup_iters: int = 3, stream=None):
        self.model, self.opt, self.params, self.window, self.amp = model, opt, params, window, amp
        self._saved = [p.detach().clone() for p in params]
        self._capture(warmup_iters, stream)

    def _body(self) -> torch.Tensor:
        with self.amp():
            loss = self.model.loss(self.window[:, :-1], self.window[:, 1:], return_state=False)[0]  # as training
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return loss

    def _capture(self, warmup_iters: int, stream=None) -> None:
        # stream: where to warm up and capture (default: a new side stream, then torch's one shared capture stream).
        # Graphs replayed at once on different streams are captured each on its own stream, so that per-stream
        # resources baked into a graph (cuBLAS workspaces) are not shared between concurrent replays.
        side = stream if stream is not None else torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_iters):
                self.opt.zero_grad(set_to_none=True)
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a CUDA call from another thread of this process cannot invalidate the capture
        with torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"):
            self.loss = self._body()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.loss

    @torch.no_grad()
    def restore(self) -> None:
        for p, saved in zip(self.params, self._saved):
            p.copy_(saved)
        for state in self.opt.state.values():  # step, exp_avg, exp_avg_sq: as before the first step
            for v in state.values():
                if torch.is_tensor(v):
                    v.zero_()
        self._saved = None


# ---- one cell ----------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _gib(n: int) -> float:
    return n / 2**30


def check_against_eager(step, model, ref, ref_opt, windows, batch, seq_len, n_steps, amp) -> dict:
    """``step(window) -> loss`` (the graphed contender) against the eager step of ``ref`` (an equal copy of
    ``model``, fresh optimizer) on the same batches, from the same weights."""
    ref_params = list(ref.parameters())
    start = [p.detach().clone() for p in ref_params]
    losses = []
    for _ in range(n_steps):
        window = windows.draw(batch, seq_len)
        got = step(window)
        want = train_step(ref, ref_opt, ref_params, window, amp)
        losses.append((float(got.detach()), float(want.detach())))
    with torch.no_grad():
        diff = math.sqrt(sum(float((p.float() - q.float()).pow(2).sum()) for p, q in zip(model.parameters(), ref_params)))
        moved = math.sqrt(sum(float((q.float() - s.float()).pow(2).sum()) for q, s in zip(ref_params, start)))
    rel = [abs(g - w) / max(abs(w), 1e-12) for g, w in losses]
    update_rel = diff / moved if moved > 0 else (0.0 if diff == 0 else math.inf)
    ok = bool(rel) and rel[0] <= LOSS_RTOL_FIRST and all(r <= LOSS_RTOL for r in rel) and update_rel <= UPDATE_RTOL
    return {"ok": ok, "losses": losses, "loss_rel_diff": rel, "update_rel_diff": update_rel}


def build_cell(args, kind: str, d_state: int, seq_len: int, cell: int = 0, stream=None):
    """One cell's model, optimizer and step (captured and checked against eager for the graphed kinds):
    ``(step, batch, check)``, ``step(window=None) -> loss`` drawing its own batch when given none."""
    device = args.device
    if args.tokens_per_step % seq_len:
        raise ValueError(f"--tokens_per_step {args.tokens_per_step} is not a multiple of seq_len {seq_len}")
    batch = args.tokens_per_step // seq_len
    seed = args.seed + cell
    torch.manual_seed(seed)
    model = build_model(args, d_state, device)
    params = list(model.parameters())
    amp = autocast(device)
    windows = Windows(args.corpus_tokens, args.vocab, device, seed)
    ref = copy.deepcopy(model) if kind in GRAPH_KINDS and args.check_steps > 0 else None
    opt = make_optimizer(model, args, device, capturable=kind == "graph")
    check = None

    if kind == "eager":
        def step():
            return train_step(model, opt, params, windows.draw(batch, seq_len), amp)
    elif kind == "lossgraph":
        from lightning_mamba.training.cuda_graph import GraphedLoss

        graphed = GraphedLoss(model)

        def step(window=None):
            window = windows.draw(batch, seq_len) if window is None else window
            return train_step(model, opt, params, window, amp, loss_fn=graphed)
    elif kind == "graph":
        static = windows.draw(batch, seq_len)
        with warnings.catch_warnings():  # "capturable=True ... step() is running without CUDA graph capture"
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            graph = StepGraph(model, opt, params, static, amp, warmup_iters=args.capture_warmup, stream=stream)
        graph.restore()
        lrs = [g["lr"] for g in opt.param_groups]

        def step(window=None):
            if window is None:
                windows.draw(batch, seq_len, out=static)
            else:
                static.copy_(window)
            for lr in lrs:  # where a schedule would write this step's lr
                lr.fill_(args.lr)
            return graph.replay()
    else:
        raise ValueError(f"unknown kind {kind!r}")

    if ref is not None:
        check = check_against_eager(step, model, ref, make_optimizer(ref, args, device), windows, batch, seq_len,
                                    args.check_steps, amp)
        if kind == "lossgraph" and graphed.replays < args.check_steps:
            check["ok"] = False
            check["why"] = f"only {graphed.replays} of {args.check_steps} steps replayed the graphs"
        del ref
        gc.collect()
    return step, batch, check


def run_cell(args, kind: str, d_state: int, seq_len: int, cell: int = 0, sync=None) -> dict:
    """One cell: build, warm up (capture, check), then time ``args.steps`` steps. ``sync``: the N-cell run's
    (barrier, done counter, n_cells)."""
    device = args.device
    t_setup = time.perf_counter()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step, batch, check = build_cell(args, kind, d_state, seq_len, cell)
    for _ in range(max(1, args.warmup)):  # at least one: compilation (and a lossgraph capture) is never timed
        step()
    _sync(device)
    setup_s = time.perf_counter() - t_setup
    if device == "cuda":
        setup_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    if sync is not None:
        barrier, done, n_cells = sync
        barrier.wait(timeout=args.cell_timeout)
    rates = []
    remaining = args.steps
    while remaining > 0:
        k = min(args.window, remaining)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(k):
            step()
        _sync(device)
        rates.append(k / (time.perf_counter() - t0))
        remaining -= k
    extra = 0
    if sync is not None:  # keep the load on until every cell has timed its windows
        with done.get_lock():
            done.value += 1
        deadline = time.perf_counter() + args.cell_timeout
        while done.value < n_cells and time.perf_counter() < deadline:
            for _ in range(args.window):
                step()
            extra += args.window
            _sync(device)
    steps_per_s = statistics.median(rates)
    out = {
        "kind": kind, "cell": cell, "d_state": d_state, "seq_len": seq_len, "batch": batch,
        "tokens_per_step": batch * seq_len, "steps_per_s": steps_per_s, "tokens_per_s": steps_per_s * batch * seq_len,
        "window_steps_per_s": rates, "setup_s": setup_s, "untimed_extra_steps": extra, "check": check,
    }
    if device == "cuda":
        out["peak_gib"] = _gib(torch.cuda.max_memory_allocated())
        out["setup_peak_gib"] = _gib(setup_peak)
        out["peak_reserved_gib"] = _gib(torch.cuda.max_memory_reserved())
    return out


def _cell_main(args, kind, cell, d_state, seq_len, barrier, done, n_cells, queue):
    """Entry point of an N-cell process (spawn)."""
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_cells))
        result = run_cell(args, kind, d_state, seq_len, cell, sync=(barrier, done, n_cells))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which prints it
        barrier.abort()  # the other cells stop waiting for this one, and stop keeping the load on for it
        with done.get_lock():
            done.value += 1
        result = {"kind": kind, "cell": cell, "d_state": d_state, "seq_len": seq_len,
                  "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        if isinstance(e, threading.BrokenBarrierError):
            result.update(error="stopped at the start barrier: another cell failed or timed out", traceback=None)
    queue.put(result)


def run_cells(args, kind: str) -> list[dict]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    n = args.cells
    barrier, done, queue = ctx.Barrier(n), ctx.Value("i", 0), ctx.Queue()
    shapes = [(args.states[i % len(args.states)], args.lens[i % len(args.lens)]) for i in range(n)]
    procs = [ctx.Process(target=_cell_main, args=(args, kind, i, s, l, barrier, done, n, queue))
             for i, (s, l) in enumerate(shapes)]
    results = {}
    try:
        for p in procs:
            p.start()
        deadline = time.perf_counter() + 2 * args.cell_timeout
        while len(results) < n and time.perf_counter() < deadline:
            try:
                r = queue.get(timeout=5)
                results[r["cell"]] = r
            except Exception:  # queue.Empty: check that the cells still live
                for i, p in enumerate(procs):
                    if i not in results and not p.is_alive() and queue.empty():
                        results[i] = {"kind": kind, "cell": i, "d_state": shapes[i][0], "seq_len": shapes[i][1],
                                      "error": f"process exited with code {p.exitcode} and no result"}
                        barrier.abort()
                        with done.get_lock():
                            done.value += 1
    finally:
        for i, p in enumerate(procs):
            p.join(timeout=30)
            if p.is_alive():  # only our own cell processes, by their handle
                p.kill()
                p.join()
                results.setdefault(i, {"kind": kind, "cell": i, "d_state": shapes[i][0], "seq_len": shapes[i][1],
                                       "error": "timed out"})
    return [results[i] for i in range(n)]


def run_streams(args, kind: str) -> list[dict]:
    """graph_Nstreams: --cells cells in THIS process, each graph_1cell's whole-step graph, every round one replay
    per cell, each cell on its own CUDA stream. Processes sharing a GPU are time-sliced (their kernels never
    overlap); streams of one process can overlap, so small cells whose kernels leave most of the GPU idle can
    run side by side. A cell's step per round: draw its batch into its static buffer and replay, both on its
    stream (a few launches of host time each, so the GIL is no bottleneck). All cells share one clock."""
    shapes = [(args.states[i % len(args.states)], args.lens[i % len(args.lens)]) for i in range(args.cells)]
    t_setup = time.perf_counter()
    torch.cuda.reset_peak_memory_stats()
    cells = []
    for i, (d_state, seq_len) in enumerate(shapes):
        stream = torch.cuda.Stream()  # the cell's own: its graph is captured and replayed there
        step, batch, check = build_cell(args, kind, d_state, seq_len, i, stream=stream)
        cells.append({"step": step, "stream": stream, "batch": batch, "check": check,
                      "d_state": d_state, "seq_len": seq_len})
    torch.cuda.synchronize()  # checks and restores ran on the default stream

    def round_():
        for c in cells:
            with torch.cuda.stream(c["stream"]):
                c["step"]()

    for _ in range(max(1, args.warmup)):
        round_()
    torch.cuda.synchronize()
    setup_s, setup_peak = time.perf_counter() - t_setup, torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    rates, remaining = [], args.steps
    while remaining > 0:
        k = min(args.window, remaining)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(k):
            round_()
        torch.cuda.synchronize()
        rates.append(k / (time.perf_counter() - t0))
        remaining -= k
    rounds_per_s = statistics.median(rates)
    peak = torch.cuda.max_memory_allocated()
    return [{"kind": kind, "cell": i, "d_state": c["d_state"], "seq_len": c["seq_len"], "batch": c["batch"],
             "tokens_per_step": c["batch"] * c["seq_len"], "steps_per_s": rounds_per_s,
             "tokens_per_s": rounds_per_s * c["batch"] * c["seq_len"], "window_steps_per_s": rates,
             "setup_s": setup_s, "untimed_extra_steps": 0, "check": c["check"], "peak_gib": _gib(peak),
             "setup_peak_gib": _gib(setup_peak), "one_process": True} for i, c in enumerate(cells)]


# ---- fit_1cell: the real `lightning-mamba fit` -------------------------------------------------
class StepTimer(L.Callback):
    """Steps/s of a Lightning fit: after ``warmup`` batches, the clock (after a CUDA synchronize, so the GPU's queue
    is drained) is read at the end of every ``window``-th batch and of the last of ``steps``. Peak memory: the
    allocator's peak over the timed steps (setup's apart), as run_cell's."""

    def __init__(self, warmup: int = 1, window: int = 20, steps: int = 100):
        self.warmup, self.window, self.steps = warmup, window, steps
        self.batches = 0
        self.rates: list[float] = []
        self.t_warm = None  # perf_counter when the warm-up ended
        self.setup_peak = self.peak = None
        self._mark = (0, 0.0)  # (batches, time) of the last clock read

    @staticmethod
    def _clock(cuda: bool) -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        timed = self.batches - self.warmup
        if timed < 0 or timed > self.steps or (timed % self.window and timed != self.steps):
            return
        cuda = pl_module.device.type == "cuda"
        now = self._clock(cuda)
        if timed == 0:
            self.t_warm = now
            if cuda:
                self.setup_peak = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
        else:
            self.rates.append((self.batches - self._mark[0]) / (now - self._mark[1]))
            if cuda and timed == self.steps:
                self.peak = torch.cuda.max_memory_allocated()
        self._mark = (self.batches, now)


def fit_callbacks(timer: dict) -> list[dict]:
    """The regime config's callbacks without FIT_LEFT_OUT, then the timer: the list --trainer.callbacks replaces the
    config's with (a list typed on the command line replaces a config file's; it is not appended)."""
    import yaml

    with open(os.path.join(ROOT, FIT_CONFIGS[-1])) as f:
        listed = yaml.safe_load(f)["trainer"]["callbacks"]
    kept = [cb for cb in listed if cb["class_path"].rsplit(".", 1)[-1] not in FIT_LEFT_OUT]
    return kept + [timer]


def fit_argv(args, save_dir: str, warmup: int) -> list[str]:
    cuda = args.device == "cuda"
    timer = {"class_path": "cell_throughput.StepTimer",
             "init_args": {"warmup": warmup, "window": args.window, "steps": args.steps}}
    argv = ["fit"]
    for config in FIT_CONFIGS:
        argv += ["--config", os.path.join(ROOT, config)]
    overrides = {
        "seed_everything": args.seed,
        "model.d_model": args.d_model, "model.n_layer": args.n_layer, "model.headdim": args.headdim,
        "model.expand": args.expand, "model.d_state": args.d_state, "model.chunk_size": args.chunk_size,
        "model.quadratic_max_len": args.quadratic_max_len, "model.save_chunk_states": str(args.save_chunk_states).lower(),
        "model.backend": args.backend, "model.cuda_graph": str(cuda).lower(),
        "model.cuda_graph_update": str(cuda and getattr(args, "cuda_graph_update", False)).lower(),
        "data.source": args.fit_source, "data.tokenizer": "byte", "data.sampling": "random_windows",
        "data.seq_len": args.seq_len, "data.batch_size": args.tokens_per_step // args.seq_len,
        "data.cache_dir": args.fit_cache_dir,
        "trainer.accelerator": args.device, "trainer.devices": 1,  # one GPU even on a host with more (no DDP)
        "trainer.precision": "bf16-mixed" if cuda else "32-true",
        "trainer.max_steps": warmup + args.steps,
        "trainer.limit_val_batches": 0, "trainer.enable_checkpointing": "false",
        "trainer.enable_progress_bar": "false", "trainer.callbacks": json.dumps(fit_callbacks(timer)),
        "trainer.logger.init_args.save_dir": save_dir,
    }
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    return argv


def run_fit(args) -> dict:
    """fit_1cell: ``lightning-mamba fit`` in this process, timed by its StepTimer."""
    import tempfile

    from lightning_mamba.training.cli import lightning_cli

    if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # imported (tests): StepTimer's class_path
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    warmup = max(1, args.warmup)  # at least one: the loss graph's capture is never timed
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_setup = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fit_1cell_") as save_dir:
        argv = fit_argv(args, save_dir, warmup)
        try:
            with warnings.catch_warnings():  # "not recommended to provide both args and command line arguments":
                warnings.filterwarnings("ignore", message=".*args parameter is intended.*")  # ours are the bench's
                cli = lightning_cli(argv)
        except SystemExit as e:  # a refused setting: OneLineErrorParser exits with the line that says why
            raise RuntimeError(f"lightning-mamba fit refused its arguments: {e.code}") from None
    timers = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "StepTimer"]
    if len(timers) != 1 or len(timers[0].rates) != math.ceil(args.steps / args.window):
        raise RuntimeError(f"the fit stopped at step {cli.trainer.global_step} of {warmup + args.steps} before "
                           f"its timed windows ended")
    timer = timers[0]
    batch = args.tokens_per_step // args.seq_len
    steps_per_s = statistics.median(timer.rates)
    graphed = getattr(cli.model, "_graphed_loss", None)
    out = {
        "kind": "fit", "cell": 0, "d_state": args.d_state, "seq_len": args.seq_len, "batch": batch,
        "tokens_per_step": batch * args.seq_len, "steps_per_s": steps_per_s,
        "tokens_per_s": steps_per_s * batch * args.seq_len, "window_steps_per_s": timer.rates,
        "setup_s": timer.t_warm - t_setup, "untimed_extra_steps": 0, "check": None,
        # what ran: the LightningModule, its vocabulary (the byte tokenizer's), the callbacks, the graphed steps
        "lightning_module": f"{type(cli.model).__module__}.{type(cli.model).__qualname__}",
        "vocab_size": cli.model.hparams.vocab_size, "global_step": cli.trainer.global_step,
        "callbacks": [type(cb).__name__ for cb in cli.trainer.callbacks],
        "cuda_graph_replays": graphed.replays if graphed is not None else None, "cli_argv": argv,
    }
    if args.device == "cuda":
        out["peak_gib"] = _gib(timer.peak)
        out["setup_peak_gib"] = _gib(timer.setup_peak)
        out["peak_reserved_gib"] = _gib(torch.cuda.max_memory_reserved())
    return out


# ---- report -----------------------------------------------------------------------------------
def summarise(name: str, cells: list[dict]) -> dict:
    ok = [c for c in cells if "error" not in c]
    row = {"contender": name, "cells": len(cells), "failed_cells": len(cells) - len(ok), "per_cell": cells}
    if ok:
        sps = [c["steps_per_s"] for c in ok]
        row.update(steps_per_s=statistics.median(sps), steps_per_s_min=min(sps), steps_per_s_max=max(sps),
                   tokens_per_s_per_cell=statistics.median(c["tokens_per_s"] for c in ok),
                   total_tokens_per_s=sum(c["tokens_per_s"] for c in ok),
                   peak_gib=max((c.get("peak_gib", math.nan) for c in ok), default=math.nan),
                   setup_peak_gib=max((c.get("setup_peak_gib", math.nan) for c in ok), default=math.nan))
    checks = [c["check"] for c in ok if c.get("check") is not None]
    row["check_ok"] = None if not checks else all(ch["ok"] for ch in checks)
    return row


def _tok(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e5 else f"{x:,.0f}"


def print_cells(row: dict) -> None:
    for c in row["per_cell"]:
        head = f"  {row['contender']} cell {c['cell']}: d_state {c['d_state']:>3}, seq_len {c['seq_len']:>4}"
        if "error" in c:
            print(f"{head}: FAILED {c['error']}")
            if c.get("traceback"):
                print("    " + c["traceback"].strip().replace("\n", "\n    "))
            continue
        rates = ", ".join(f"{r:.1f}" for r in c["window_steps_per_s"])
        print(f"{head}, batch {c['batch']:>4}: {c['steps_per_s']:7.1f} steps/s {_tok(c['tokens_per_s']):>7} tokens/s"
              f"  peak {c.get('peak_gib', math.nan):.2f} GiB (setup {c.get('setup_peak_gib', math.nan):.2f})"
              f"  setup {c['setup_s']:.1f} s  windows [{rates}]")
        if c.get("lightning_module"):
            graphed = "" if c["cuda_graph_replays"] is None else f", {c['cuda_graph_replays']} graphed loss replays"
            print(f"    {c['lightning_module']}, vocab {c['vocab_size']} (the byte tokenizer's), {c['global_step']} "
                  f"steps{graphed}; callbacks {', '.join(c['callbacks'])}")
        ch = c.get("check")
        if ch is not None:
            losses = ", ".join(f"{g:.5f}/{w:.5f}" for g, w in ch["losses"])
            print(f"    check vs eager: {'ok' if ch['ok'] else 'FAILED'} (losses graphed/eager {losses}; "
                  f"max loss rel diff {max(ch['loss_rel_diff']):.1e}, update rel diff {ch['update_rel_diff']:.1e}"
                  f"{'; ' + ch['why'] if ch.get('why') else ''})")


def print_table(rows: list[dict], tokens_per_step: int, skipped: dict[str, str]) -> None:
    # the named baseline: the eager single cell, in the quadratic scan's form too (eager_1cell_quadratic)
    base = next((r for r in rows if contender_setting(r["contender"])[0] == "eager_1cell" and "steps_per_s" in r),
                None)
    target_tokens = TARGET_STEPS_PER_CELL * tokens_per_step
    print()
    print(f"targets: >= {TARGET_STEPS_PER_CELL:.0f} steps/s per cell ({target_tokens / 1e6:.2f}M tokens/s at "
          f"{tokens_per_step:,} tokens/step), >= {TARGET_TOTAL_TOKENS / 1e6:.0f}M tokens/s over all cells")
    head = (f"{'contender':<22} {'cells':>5} {'steps/s/cell':>12} {'(min-max)':>15} {'tok/s/cell':>11} "
            f"{'total tok/s':>12} {'peak GiB':>8} {'x eager':>8} {'per-cell target':>15} {'total target':>12} check")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "steps_per_s" not in r:
            print(f"{r['contender']:<22} {r['cells']:>5}  all cells failed")
            continue
        ratio = r["total_tokens_per_s"] / base["total_tokens_per_s"] if base else math.nan
        spread = f"({r['steps_per_s_min']:.1f}-{r['steps_per_s_max']:.1f})"
        check = {None: "-", True: "ok", False: "FAILED"}[r["check_ok"]]
        if r["failed_cells"]:
            check += f" ({r['failed_cells']} cells failed)"
        per_cell_met = "met" if r["steps_per_s_min"] >= TARGET_STEPS_PER_CELL else "no"
        total_met = "met" if r["total_tokens_per_s"] >= TARGET_TOTAL_TOKENS else "no"
        print(f"{r['contender']:<22} {r['cells']:>5} {r['steps_per_s']:12.1f} {spread:>15} "
              f"{_tok(r['tokens_per_s_per_cell']):>11} {_tok(r['total_tokens_per_s']):>12} "
              f"{r['peak_gib']:8.2f} {ratio:8.2f} {per_cell_met:>15} {total_met:>12} {check}")
    for name, why in skipped.items():
        print(f"{name:<22} skipped: {why}")
    if base:
        print(f"x eager: total tokens/s / {base['contender']}'s ({_tok(base['total_tokens_per_s'])}); per-cell target "
              f"judged on the slowest cell; peak: allocator peak of one process during the timed steps")


def environment(args) -> dict:
    env = {"torch": torch.__version__, "device": args.device, "cpu_count": os.cpu_count()}
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        from lightning_mamba.models.kernels.backend import _triton_scan

        fn, why = _triton_scan()  # first: it lets mamba_ssm import without its Mamba-1 extension
        for mod in ("triton", "mamba_ssm"):
            with contextlib.suppress(Exception):
                env[mod] = __import__(mod).__version__
        env["triton_kernels"] = args.backend != "torch" and fn is not None
        if fn is None and args.backend != "torch":
            env["triton_kernels_missing"] = why
        from lightning_mamba.commands.mps import control_pipe

        # graph_Ncells depends on it: without MPS the processes take turns on the GPU (docs/performance.md)
        env["cuda_mps"] = "on" if os.path.exists(control_pipe()) else "off"
    return env


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--steps", type=int, default=100, help="timed steps per contender (per cell)")
    p.add_argument("--window", type=int, default=20, help="steps per timed window (median over windows)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps after capture and check (at least 1)")
    p.add_argument("--d_state", type=int, default=128, help="d_state of the 1-cell contenders")
    p.add_argument("--seq_len", type=int, default=512, help="LEN of the 1-cell contenders")
    p.add_argument("--tokens_per_step", type=int, default=16384, help="batch = tokens_per_step / LEN")
    p.add_argument("--cells", type=int, default=8, help="processes of the N-cell contenders")
    p.add_argument("--states", default="16,32,64,128,256,512", help="d_state of cell i: states[i %% len]")
    p.add_argument("--lens", default="32,128,512,1024", help="LEN of cell i: lens[i %% len]")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    p.add_argument("--contenders", default=None,
                   help=f"comma list of {', '.join(CONTENDERS)} (default on CUDA: all but eager_Ncells and "
                        f"lossgraph_Ncells; on CPU: eager_1cell)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON to OUT")
    p.add_argument("--check_steps", type=int, default=3, help="graphed vs eager steps before timing (0: no check)")
    p.add_argument("--capture_warmup", type=int, default=3, help="graph_1cell's warm-up iterations before capture")
    p.add_argument("--cell_timeout", type=float, default=300.0,
                   help="seconds an N-cell process waits for the others at the start barrier (the whole N-cell run "
                        "is stopped after twice this)")
    p.add_argument("--corpus_tokens", type=int, default=1 << 22, help="random tokens on the device windows come from")
    p.add_argument("--fit_source", default="code",
                   help="fit_1cell's data.source: code (the study's byte-level Python source), a folder or file of "
                        "text, a hub dataset name")
    p.add_argument("--fit_cache_dir", default="data", help="fit_1cell's data.cache_dir (the CLI's default: data)")
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--headdim", type=int, default=32)
    p.add_argument("--expand", type=int, default=2)
    p.add_argument("--chunk_size", type=int, default=256)
    p.add_argument("--quadratic_max_len", type=int, default=0,
                   help="the model's quadratic_max_len: LEN <= this takes the scan's attention form (0: chunked); "
                        "a <contender>_quadratic contender raises it to --seq_len")
    p.add_argument("--save_chunk_states", action="store_true",
                   help="the model's save_chunk_states for every contender: the chunked scan's backward reuses the "
                        "forward's states (a <contender>_savestates contender turns it on for itself)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.states = [int(s) for s in str(args.states).split(",") if s]
    args.lens = [int(s) for s in str(args.lens).split(",") if s]
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here (use --device cpu)")
    if args.steps < 1 or args.window < 1 or args.cells < 1:
        p.error("--steps, --window and --cells must be >= 1")
    default = ("eager_1cell,fit_1cell,lossgraph_1cell,graph_1cell,graph_Ncells" if args.device == "cuda"
               else "eager_1cell")
    args.contenders = [c for c in (args.contenders or default).split(",") if c]
    unknown = [c for c in args.contenders if contender_setting(c)[0] not in CONTENDERS]
    if unknown:
        p.error(f"unknown contender(s) {', '.join(unknown)}: use {', '.join(CONTENDERS)} (a *_1cell one may end in "
                f"{QUADRATIC}, {QUADRATIC_TORCH}, {QUADRATIC_BLOCKED}, then any of {', '.join(MODIFIERS)})")
    both_convs = [c for c in args.contenders if {TRITONCONV, LIBCONV} <= _modifiers(c)[1]]
    if both_convs:
        p.error(f"contender(s) {', '.join(both_convs)} ask for two convs: keep one of {TRITONCONV} (ours at every row "
                f"length) and {LIBCONV} (causal_conv1d's)")
    not_fit = [c for c in args.contenders if GRAPHUPDATE in _modifiers(c)[1] and contender_setting(c)[0] != "fit_1cell"]
    if not_fit:
        p.error(f"contender(s) {', '.join(not_fit)}: {GRAPHUPDATE} is a setting of the fit (fit_1cell{GRAPHUPDATE}); "
                f"graph_1cell graphs its whole step already")
    n_cells = any(c.endswith(("_Ncells", "_Nstreams")) for c in args.contenders)
    for length in [args.seq_len] + (args.lens if n_cells else []):
        if args.tokens_per_step % length:
            p.error(f"--tokens_per_step {args.tokens_per_step} must be a multiple of every LEN (got {length})")
    from lightning_mamba.models.kernels.backend import check_backend

    check_backend(args.backend)
    return args


QUADRATIC, QUADRATIC_TORCH, QUADRATIC_BLOCKED = "_quadratic", "_quadratic_torch", "_quadratic_blocked"
SPLITCAT, SAVESTATES = "_splitcat", "_savestates"  # the last suffixes of a 1-cell contender, in any order
# and these A/Bs of one change each
TORCHEMBEDDING, REMADESCORES, TRITONCONV, LIBCONV = "_torchembedding", "_remadescores", "_tritonconv", "_libconv"
GRAPHUPDATE = "_graphupdate"  # fit_1cell only: --model.cuda_graph_update true
MODIFIERS = (SPLITCAT, SAVESTATES, TORCHEMBEDDING, REMADESCORES, TRITONCONV, LIBCONV, GRAPHUPDATE)


def _modifiers(name: str) -> tuple[str, set[str]]:
    """A 1-cell contender's name without its trailing modifiers (MODIFIERS), and those found (else name, none)."""
    base, found = name, set()
    while suffix := next((s for s in MODIFIERS if s not in found and base.endswith(s)), None):
        base, found = base.removesuffix(suffix), found | {suffix}
    return (base, found) if found and "_1cell" in base else (name, set())


def _without_splitcat(name: str) -> str:
    return _modifiers(name)[0]


def contender_setting(name: str) -> tuple[str, bool]:
    """(the contender, whether it runs with the quadratic scan): ``graph_1cell_quadratic``,
    ``graph_1cell_quadratic_torch`` and ``graph_1cell_quadratic_splitcat`` -> (graph_1cell, True). Only 1-cell
    contenders take the suffixes (an unknown name is left whole, for parse_args to refuse)."""
    stripped = _without_splitcat(name)
    for suffix in (QUADRATIC_TORCH, QUADRATIC_BLOCKED, QUADRATIC):
        base = stripped.removesuffix(suffix)
        if base != stripped and base.endswith("_1cell"):
            return base, True
    return (stripped, False) if stripped.endswith("_1cell") else (name, False)


def quadratic_kernel_of(name: str) -> str:
    """The attention form's code for a contender: ``torch`` (ssd.ssd_quadratic's einsums) for a name ending in
    ``_quadratic_torch`` (then perhaps modifiers), ``blocked`` (the 64-token-block kernels at every row length) for
    ``_quadratic_blocked``, else ``ours`` (the fused Triton kernels, the model's default on CUDA)."""
    base = _without_splitcat(name)
    return "torch" if base.endswith(QUADRATIC_TORCH) else "blocked" if base.endswith(QUADRATIC_BLOCKED) else "ours"


def splits_in_place(name: str) -> bool:
    """False for a contender ending in ``_splitcat``: the mixer's splits as torch.split's (their backward
    concatenates), not grad_slots.py's in-place writes, for the A/B in one process."""
    return SPLITCAT not in _modifiers(name)[1]


def kernel_choices(name: str) -> contextlib.ExitStack:
    """The kernel switches a 1-cell contender runs under: the attention form's code (quadratic_kernel_of), the
    splits (splits_in_place), the small-vocabulary embedding backward (torch's for a name with ``_torchembedding``),
    the chunked scan's scores (made again in the backward for ``_remadescores``) and the conv (ours at every row
    length for ``_tritonconv``, causal_conv1d's for ``_libconv``)."""
    from lightning_mamba.models.kernels.backend import embedding_kernels, ours_conv_max_len, quadratic_kernels
    from lightning_mamba.models.kernels.grad_slots import in_place
    from lightning_mamba.models.kernels.ssd_chunked_mamba import scores_kept

    found = _modifiers(name)[1]
    stack = contextlib.ExitStack()
    stack.enter_context(quadratic_kernels(quadratic_kernel_of(name)))
    stack.enter_context(in_place(splits_in_place(name)))
    stack.enter_context(embedding_kernels("torch" if TORCHEMBEDDING in found else "ours"))
    stack.enter_context(scores_kept(REMADESCORES not in found))
    if TRITONCONV in found or LIBCONV in found:
        stack.enter_context(ours_conv_max_len(1 << 30 if TRITONCONV in found else 0))
    return stack


def with_settings(args, name: str):
    """args for one 1-cell contender: a quadratic one trains with quadratic_max_len at least its LEN, one ending in
    ``_savestates`` with save_chunk_states, a fit ending in ``_graphupdate`` with model.cuda_graph_update."""
    quadratic = contender_setting(name)[1]
    found = _modifiers(name)[1]
    return argparse.Namespace(**{
        **vars(args), "quadratic_max_len": max(args.quadratic_max_len, args.seq_len) if quadratic else
        args.quadratic_max_len, "save_chunk_states": args.save_chunk_states or SAVESTATES in found,
        "cuda_graph_update": GRAPHUPDATE in found})


def write_json(path: str, args, env: dict, skipped: dict, rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"args": vars(args), "env": env, "skipped": skipped, "results": rows,
                   "targets": {"steps_per_s_per_cell": TARGET_STEPS_PER_CELL, "total_tokens_per_s": TARGET_TOTAL_TOKENS}},
                  f, indent=1)


def main(argv=None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # each line as it comes, also into a file or pipe
    args = parse_args(argv)
    env = environment(args)
    print("# " + ", ".join(f"{k} {v}" for k, v in env.items() if v is not None))
    print(f"# model {args.n_layer} x {args.d_model}, headdim {args.headdim}, expand {args.expand}, vocab {args.vocab},"
          f" chunk {args.chunk_size}, quadratic_max_len {args.quadratic_max_len}, backend {args.backend}; "
          f"{args.tokens_per_step:,} tokens/step; "
          f"{'bf16 autocast, fused AdamW' if args.device == 'cuda' else 'fp32, AdamW'}, clip 1.0; "
          f"{args.steps} timed steps in windows of {args.window} after {args.warmup} warm-up steps")
    rows, skipped = [], {}
    for name in args.contenders:
        base, quadratic = contender_setting(name)
        kind, _, n = base.partition("_")
        if kind in GRAPH_KINDS and args.device != "cuda":
            skipped[name] = f"needs CUDA graphs (device is {args.device})"
            print(f"{name}: skipped ({skipped[name]})")
            continue
        t0 = time.perf_counter()
        if n == "1cell":
            cell_args = with_settings(args, name)
            try:
                with kernel_choices(name):
                    cells = [run_fit(cell_args) if kind == "fit"
                             else run_cell(cell_args, kind, args.d_state, args.seq_len)]
                cells[0]["quadratic_max_len"] = cell_args.quadratic_max_len
                cells[0]["save_chunk_states"] = cell_args.save_chunk_states
            except Exception as e:  # noqa: BLE001 - one contender's failure must not hide the others
                cells = [{"kind": kind, "cell": 0, "d_state": args.d_state, "seq_len": args.seq_len,
                          "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}]
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
        elif n == "Nstreams":
            try:
                cells = run_streams(args, kind)
            except Exception as e:  # noqa: BLE001 - one contender's failure must not hide the others
                cells = [{"kind": kind, "cell": 0, "d_state": args.states[0], "seq_len": args.lens[0],
                          "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}]
            gc.collect()
            torch.cuda.empty_cache()
        else:
            cells = run_cells(args, kind)
        row = summarise(name, cells)
        rows.append(row)
        print(f"{name}: {time.perf_counter() - t0:.0f} s wall")
        print_cells(row)
        if args.json:  # after every contender: a run stopped later still leaves these
            write_json(args.json, args, env, skipped, rows)
    print_table(rows, args.tokens_per_step, skipped)
    fit_vocab = {c["vocab_size"] for r in rows for c in r["per_cell"] if c.get("vocab_size")}
    if fit_vocab - {args.vocab}:  # the LM head's size is part of the step: the bare contenders should match it
        print(f"note: fit_1cell trained at vocab {', '.join(map(str, fit_vocab))} (its byte tokenizer's), the bare "
              f"contenders at --vocab {args.vocab}: pass --vocab {min(fit_vocab)} to compare like with like")
    failed = any(r["check_ok"] is False or r["failed_cells"] for r in rows)
    if args.json:
        write_json(args.json, args, env, skipped, rows)
        print(f"# wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
