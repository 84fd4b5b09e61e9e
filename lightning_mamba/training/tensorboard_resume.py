"""A resumed run's TensorBoard curves without the interrupted run's steps past the checkpoint.

A run killed some steps after its last checkpoint (SIGKILL, a crash, a NaN stop resumed from an earlier checkpoint)
has logged those steps; resumed into the same run directory, it trains and logs them again, and TensorBoard draws
both: a curve that runs back on itself. TensorBoard's own answer for a restart is a "session start" event at the step
the run goes on from: on reading it, TensorBoard hides the events of earlier files at that step and later (the files
keep them). The resumed run writes one at the checkpoint's step + 1, so nothing it does not log again is hidden: the
checkpoint's step keeps the interrupted run's evaluations (a resumed run redoes only those left unfinished,
training/validation.py and the evaluation callbacks) beside the first training step logged again, which on an exact
resume has the same value.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger


def hide_replayed_steps(trainer: L.Trainer) -> None:
    """On a resume (``fit --ckpt_path``) at step N > 0, write TensorBoard's session start at step N + 1 into every
    TensorBoard logger's event file (rank 0)."""
    if trainer.ckpt_path is None or trainer.global_step == 0 or not trainer.is_global_zero:
        return
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    start = Event(step=trainer.global_step + 1, session_log=SessionLog(status=SessionLog.START))
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            writer = logger.experiment  # torch's SummaryWriter: its file writer exists once it is made
            writer.file_writer.add_event(start)
            writer.flush()
