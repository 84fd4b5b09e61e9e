"""The forgetting callbacks' TensorBoard figures, drawn in a process of their own.

Drawing a figure is host time (~0.1-0.3 s each: matplotlib's text layout, Agg, PNG): in the training process the GPU
waits through it, and the study's small cells evaluate every few seconds (six state-statistics figures took ~1.3-2.4
s of a ~4 s span between evaluations on an H100 host, docs/performance.md). Here a callback hands the figure's
recipe (a picklable callable: ``functools.partial`` of a plotting function and its arrays) to one worker process,
which draws it and builds the image summary with TensorBoard's own functions, as ``add_figure`` does; the training
process only writes that summary into the logger's event file, at the step it belongs to. The callbacks collect finished
figures after every training batch and wait for the rest before the loggers close. A recipe that cannot be pickled,
or a worker that cannot start or fails, is drawn in the training process as before."""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

_pool: concurrent.futures.ProcessPoolExecutor | None = None  # one worker a process, for every callback and fit
_pool_failed = False


def render_summary(make_figure: Callable[[], Any], tag: str) -> bytes:
    """The figure ``make_figure()`` returns as a serialized image summary: what ``SummaryWriter.add_figure`` builds
    (``figure_to_image``, then ``summary.image``), made in the drawing process."""
    from torch.utils.tensorboard._utils import figure_to_image
    from torch.utils.tensorboard.summary import image

    return image(tag, figure_to_image(make_figure(), close=True), dataformats="CHW").SerializeToString()


@contextlib.contextmanager
def _bare_main() -> Iterator[None]:
    """A spawned process runs the parent's ``__main__`` script again (as ``__mp_main__``): an unguarded training
    script would train twice. The drawing process needs nothing from it, so it is started under a bare one."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _worker() -> concurrent.futures.ProcessPoolExecutor | None:
    """The drawing process (spawned: a forked copy of a process holding CUDA and threads is not safe), or None."""
    global _pool, _pool_failed
    if _pool is None and not _pool_failed:
        try:
            pool = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
            with _bare_main():
                pool.submit(os.getpid).result(timeout=120)  # starts it now, while __main__ is bare
            _pool = pool
        except Exception as e:  # noqa: BLE001 - no process (a sandbox, a broken interpreter): draw in this one
            _pool_failed = True
            rank_zero_warn(f"figures: no drawing process ({type(e).__name__}: {e}); drawing them in the training "
                           f"process")
    return _pool


def write_summary(writer, summary: bytes, step: int) -> None:
    """A serialized summary into a torch SummaryWriter's event file, as ``add_image`` writes one."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    writer._get_file_writer().add_summary(Summary.FromString(summary), step)


class FigureQueue:
    """A callback's figures in flight: ``submit`` hands one to the drawing process (``in_process``: draw it here),
    ``collect`` writes those finished (all of them, waiting and then flushing the event files, with ``wait``)."""

    def __init__(self, in_process: bool = False):
        self.in_process = in_process
        self._pending: list[tuple[concurrent.futures.Future, Callable, str, int, list]] = []

    def submit(self, make_figure: Callable[[], Any], tag: str, step: int, writers: list) -> None:
        pool = None if self.in_process or not writers else _worker()
        if pool is None:
            _draw_here(make_figure, tag, step, writers)
            return
        try:
            future = pool.submit(render_summary, make_figure, tag)
        except Exception:  # noqa: BLE001 - a broken or shut-down pool: draw here
            _draw_here(make_figure, tag, step, writers)
            return
        self._pending.append((future, make_figure, tag, step, writers))

    def collect(self, wait: bool = False) -> None:
        written = {}
        while self._pending and (wait or self._pending[0][0].done()):
            future, make_figure, tag, step, writers = self._pending.pop(0)
            written.update((id(writer), writer) for writer in writers)
            try:
                summary = future.result()
            except Exception:  # noqa: BLE001 - not picklable, or the worker failed: the training process draws it
                _draw_here(make_figure, tag, step, writers)
                continue
            for writer in writers:
                write_summary(writer, summary, step)
        if wait:  # on the disk now: a reader (or a process ending without closing the writer) sees them all
            for writer in written.values():
                writer.flush()


def _draw_here(make_figure: Callable[[], Any], tag: str, step: int, writers: list) -> None:
    from ..analysis import plots

    fig = make_figure()
    for writer in writers:
        writer.add_figure(tag, fig, global_step=step, close=False)
    plots.close(fig)
