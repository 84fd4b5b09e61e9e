"""Where the host's time in a `lightning-mamba fit` step goes (issue [throughput], item 4).

    python benchmarks/fit_host_time.py --device cpu            # a tiny model on the CPU: the host cost of each part
    python benchmarks/fit_host_time.py --syncs                 # GPU, the study's cell (d_state 64, LEN 64, chunk 64)

Runs cell_throughput.py's fit_1cell (the real fit: configs/train.yaml + configs/experiment/regime.yaml, CUDA graphs on
a GPU, no validation or checkpoints) with a Lightning profiler that times every hook Lightning profiles (callbacks,
LightningModule and strategy hooks, the batch fetch) plus the parts below, and prints each part's EXCLUSIVE host time
per timed step (its time minus that of the timed parts inside it), and what none of them covers (Lightning's loop).
On a GPU a part that waits for the device (a host<->device sync) stands out by its time; --syncs also lists the syncs
torch reports (torch.cuda.set_sync_debug_mode) with the line of ours or Lightning's that made them.
--device cpu uses a 1 x 32 model (d_state 8, LEN 16, batch 4, torch backend, one thread): its forward, backward and
AdamW math are the CPU's compute (on a GPU: graph replays and fused kernels); every other part is host work that the
GPU run has too. ``--clock cpu`` times the parts in this thread's CPU time (steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import lightning as L
import torch
from lightning.pytorch.profilers import Profiler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cell_throughput as ct  # noqa: E402

if __name__ == "__main__":  # the profiler's class_path names this module
    sys.modules.setdefault("fit_host_time", sys.modules[__name__])

CPU_SHAPE = ["--d_state", "8", "--seq_len", "16", "--tokens_per_step", "64", "--d_model", "32", "--n_layer", "1",
             "--headdim", "8", "--chunk_size", "16", "--backend", "torch"]
GPU_SHAPE = ["--d_state", "64", "--seq_len", "64", "--chunk_size", "64", "--backend", "auto"]
STEP_START = "[_TrainingEpochLoop].train_dataloader_next"  # the first action of every training step


def _parts():
    """(label, owner, attribute): functions timed besides Lightning's own profiled actions."""
    import lightning.pytorch as pl
    from lightning.pytorch.loops.optimization.automatic import Closure
    from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector
    from torch.utils.data import _utils as data_utils, dataloader

    from lightning_mamba.data.packed import PackedTextDataset
    from lightning_mamba.models import MambaLM
    from lightning_mamba.training.cuda_graph import GraphedLoss, GraphedUpdate

    return [
        ("data: DataLoader next (sampler, collate)", dataloader._BaseDataLoaderIter, "__next__"),
        ("data: windows gather (__getitems__)", PackedTextDataset, "__getitems__"),
        ("data: pin memory", data_utils.pin_memory, "pin_memory"),
        ("self.log (Lightning's bookkeeping)", pl.LightningModule, "log"),
        ("Lightning: per-batch metrics (logger connector)", _LoggerConnector, "on_batch_end"),
        ("Lightning: logging-step metrics (logger connector)", _LoggerConnector, "update_train_step_metrics"),
        ("Lightning: closure", Closure, "__call__"),
        ("loss: GraphedLoss (input copy, the forward + backward replay)", GraphedLoss, "__call__"),
        ("update: GraphedUpdate's replay (--cuda_graph_update)", GraphedUpdate, "step"),
        ("model.loss forward (CPU: its math; GPU: only at the capture)", MambaLM, "loss"),
        ("backward (CPU: its math; GPU: the replayed gradients handed over)", torch.autograd, "backward"),
        ("clip_grad_norm_ (its own norm: no NaN guard offered one)", torch.nn.utils, "clip_grad_norm_"),
        ("clipping by the NaN guard's norm (clip_grads_with_norm_)", torch.nn.utils, "clip_grads_with_norm_"),
        ("NaN guard: get_total_norm", torch.nn.utils, "get_total_norm"),
        ("optimizer: AdamW.step's own code", torch.optim.AdamW, "step"),
        ("AdamW update (CPU: its math; GPU: the fused kernels' launch)", importlib.import_module("torch.optim.adam"),
         "adam"),
        ("optimizer: zero_grad", torch.optim.Optimizer, "zero_grad"),
        ("lr schedule: LambdaLR.step", torch.optim.lr_scheduler.LRScheduler, "step"),
    ]


_ACTIVE: list = []  # the HostTimeProfiler the CLI built (the wrapped parts report to it)


def wrap(label: str, owner, attr: str):
    """Time ``owner.attr`` as the part ``label`` of the active HostTimeProfiler; returns what undoes it."""
    fn, own = getattr(owner, attr), attr in vars(owner)

    def timed(*args, **kwargs):
        if not _ACTIVE:
            return fn(*args, **kwargs)
        prof = _ACTIVE[-1]
        prof.start(label)
        try:
            return fn(*args, **kwargs)
        finally:
            prof.stop(label)

    timed.__dict__.update(getattr(fn, "__dict__", {}))  # e.g. torch's "hooked" mark of an optimizer's step
    setattr(owner, attr, timed)
    return lambda: setattr(owner, attr, fn) if own else delattr(owner, attr)


class HostTimeProfiler(Profiler):
    """Exclusive host time of every profiled action and timed part, summed over the steps after ``skip`` steps."""

    def __init__(self, skip: int = 10, clock: str = "wall"):
        super().__init__()
        self.skip = skip
        # "cpu": this thread's CPU time, which other processes on a shared machine do not inflate (a GPU sync that
        # spins counts too; one that sleeps does not)
        self.clock = time.thread_time if clock == "cpu" else time.perf_counter
        self.steps = 0  # training steps begun
        self.excl: dict[str, float] = collections.defaultdict(float)  # over the complete timed steps
        self.calls: dict[str, int] = collections.defaultdict(int)
        self.periods: list[float] = []  # each complete timed step, from its start to the next one's
        self._step: tuple | None = None  # the step under way: (start, {part: time}, {part: calls})
        self._stack: list[list] = []  # [name, t0, time of timed children]
        _ACTIVE.append(self)

    def start(self, action_name: str) -> None:
        now = self.clock()
        if action_name == STEP_START:
            self.steps += 1
            if self._step is not None:  # the step before is complete: count it
                t0, excl, calls = self._step
                self.periods.append(now - t0)
                for k, v in excl.items():
                    self.excl[k] += v
                    self.calls[k] += calls[k]
            self._step = (now, collections.defaultdict(float), collections.defaultdict(int)) \
                if self.steps > self.skip else None
        self._stack.append([action_name, now, 0.0])

    def stop(self, action_name: str) -> None:
        if not self._stack or self._stack[-1][0] != action_name:
            return  # an action opened before this profiler was
        name, t0, inner = self._stack.pop()
        spent = self.clock() - t0
        if self._stack:
            self._stack[-1][2] += spent
        if self._step is not None:
            self._step[1][name] += spent - inner
            self._step[2][name] += 1

    def summary(self) -> str:
        return ""

    def table(self) -> tuple[float, list[tuple[float, float, str]]]:
        """(ms per step, [(ms per step, calls per step, part)]) over the complete timed steps."""
        n = len(self.periods)
        period = sum(self.periods) / n * 1e3
        rows = [(t / n * 1e3, self.calls[k] / n, k) for k, t in self.excl.items()]
        rows.append((period - sum(r[0] for r in rows), 1.0, "outside every timed part (Lightning's loop)"))
        return period, sorted(rows, reverse=True)


class SyncLog:
    """Host<->device syncs torch reports once set_sync_debug_mode is 'warn', by the stack of the code that made them."""

    def __init__(self):
        self.sites: collections.Counter = collections.Counter()
        self._show = None

    def __enter__(self):
        self._show, self._filters = warnings.showwarning, warnings.filters[:]
        warnings.simplefilter("always")  # every sync, not the first one of each line

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" not in str(message):
                return self._show(message, category, filename, lineno, file, line)
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename
                      and not f.filename.endswith(("fit_host_time.py", "warnings.py"))]
            self.sites[" <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}({f.name})" for f in frames[::-1][:4])] += 1

        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self._show is not None:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning, self._show = self._show, None
            warnings.filters[:] = self._filters


SYNCS = SyncLog()


class SyncsAfterWarmup(L.Callback):
    """Turns SYNCS on after ``skip`` batches (the capture and the warm-up sync as they must) and off at the end."""

    def __init__(self, skip: int = 10):
        self.skip, self.batches = skip, 0

    def on_train_batch_end(self, *args) -> None:
        self.batches += 1
        if self.batches == self.skip:
            SYNCS.__enter__()

    def on_train_end(self, *args) -> None:
        SYNCS.__exit__()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--steps", type=int, default=300, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (the CUDA graph capture among them)")
    p.add_argument("--fit_source", default="default", help="data.source (cell_throughput's --fit_source)")
    p.add_argument("--fit_cache_dir", default="data")
    p.add_argument("--syncs", action="store_true", help="CUDA: list the syncs of the timed steps")
    p.add_argument("--no_timers", action="store_true", help="the step time alone (the timers cost host time too)")
    p.add_argument("--cuda_graph_update", action="store_true",
                   help="the fit with --model.cuda_graph_update true (its update replayed as a graph; CUDA)")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="the parts' clock: wall time, or this thread's CPU time (steadier on a shared machine)")
    a, rest = p.parse_known_args(argv)  # the rest: cell_throughput's shape options (--d_model, --d_state, ...)
    if a.device == "cpu":
        torch.set_num_threads(1)
    shape = (CPU_SHAPE if a.device == "cpu" else GPU_SHAPE) + ["--vocab", "257"]
    args = ct.parse_args(["--device", a.device, "--steps", str(a.steps), "--window", str(a.steps), "--warmup",
                          str(a.warmup), "--fit_source", a.fit_source, "--fit_cache_dir", a.fit_cache_dir]
                         + shape + rest)
    args.cuda_graph_update = a.cuda_graph_update
    from lightning_mamba.training.cli import lightning_cli

    undo = [] if a.no_timers else [wrap(*part) for part in _parts()]
    syncs = a.syncs and a.device == "cuda"
    _ACTIVE.clear()
    with tempfile.TemporaryDirectory(prefix="fit_host_time_") as save_dir:
        argv_fit = ct.fit_argv(args, save_dir, a.warmup)
        at = argv_fit.index("--trainer.callbacks") + 1
        callbacks = json.loads(argv_fit[at])
        if syncs:
            callbacks.append({"class_path": "fit_host_time.SyncsAfterWarmup", "init_args": {"skip": a.warmup}})
        argv_fit[at] = json.dumps(callbacks)
        if not a.no_timers:
            argv_fit += ["--trainer.profiler", json.dumps({"class_path": "fit_host_time.HostTimeProfiler",
                                                           "init_args": {"skip": a.warmup, "clock": a.clock}})]
        try:
            cli = lightning_cli(argv_fit)
        finally:
            SYNCS.__exit__()
            for restore in undo:
                restore()
    timer = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "StepTimer")
    rate = statistics.median(timer.rates)
    print(f"# {a.device}: {args.n_layer} x {args.d_model}, d_state {args.d_state}, LEN {args.seq_len}, batch "
          f"{args.tokens_per_step // args.seq_len}; {a.steps} timed steps after {a.warmup}")
    print(f"step time (StepTimer, synchronised at both ends): {1e3 / rate:.3f} ms ({rate:.1f} steps/s)")
    if _ACTIVE:
        period, rows = _ACTIVE.pop().table()
        print(f"host time per step by part (exclusive, {a.clock} clock; mean step period {period:.3f} ms with the "
              f"timers on):")
        for ms, calls, name in rows:
            if ms >= 0.002:
                print(f"  {ms:8.3f} ms  {calls:4.1f}x  {name}")
    if syncs:
        print(f"syncs over the {a.steps} timed steps ({sum(SYNCS.sites.values()) / a.steps:.2f} per step):")
        for site, count in SYNCS.sites.most_common():
            print(f"  {count / a.steps:6.2f}/step  {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
