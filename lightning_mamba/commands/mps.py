"""CUDA's Multi-Process Service (MPS) for the sweep's shards. Processes sharing one GPU take turns on it; under MPS
their kernels run at once (docs/performance.md: four graphed study cells made 0.94x one alone without it, 1.25x
with it). ``private_daemon`` starts a control daemon of the sweep's own, its pipe and log folders in a fresh
temporary folder, so only the processes given its environment (the shards) use it, and quits it afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator

from ..errors import UserError

CONTROL = "nvidia-cuda-mps-control"  # ships with the NVIDIA driver


class MPSError(UserError, RuntimeError):
    """The daemon could not be started: one line saying what to change."""


def control_pipe(env: dict[str, str] | None = None) -> str:
    """Where a running MPS control daemon keeps its socket (CUDA_MPS_PIPE_DIRECTORY, default /tmp/nvidia-mps)."""
    env = os.environ if env is None else env
    return os.path.join(env.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"), "control")


def time_slicing_note(processes: int, gpus: int) -> str | None:
    """A line when shards will share a GPU with no MPS daemon running (none found at the environment's pipe)."""
    pipe = control_pipe()
    if gpus < 1 or processes <= gpus or os.path.exists(pipe):
        return None
    return (f"sweep: {processes} shards on {gpus} GPU(s) and no CUDA MPS daemon ({pipe} is missing): "
            "processes sharing a GPU take turns on it (4 cells: 0.94x one alone, under MPS 1.25x); add --mps true, "
            "or run one shard per GPU")


@contextlib.contextmanager
def private_daemon(log: Callable[[str], None] = print, wait_s: float = 10.0) -> Iterator[dict[str, str]]:
    """Start ``nvidia-cuda-mps-control -d`` with pipe and log folders of its own; yield the environment variables a
    process needs to be its client; on exit send it ``quit`` and remove the folders."""
    exe = shutil.which(CONTROL)
    if exe is None:
        raise MPSError(f"--mps true: {CONTROL} is not on PATH (it comes with the NVIDIA driver): drop --mps")
    root = tempfile.mkdtemp(prefix="lightning-mamba-mps-")  # short: a UNIX socket's path is limited to ~100 bytes
    env = {"CUDA_MPS_PIPE_DIRECTORY": os.path.join(root, "pipe"), "CUDA_MPS_LOG_DIRECTORY": os.path.join(root, "log")}
    for folder in env.values():
        os.makedirs(folder)
    full = {**os.environ, **env}
    try:
        started = subprocess.run([exe, "-d"], env=full, capture_output=True, text=True, timeout=60)
        if started.returncode != 0:
            why = (started.stderr or started.stdout).strip() or f"exit status {started.returncode}"
            raise MPSError(f"--mps true: {CONTROL} -d failed ({why}): drop --mps, or start MPS yourself")
        deadline = time.monotonic() + wait_s
        while not os.path.exists(control_pipe(env)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not os.path.exists(control_pipe(env)):
            raise MPSError(f"--mps true: {CONTROL} -d started but no socket appeared at {control_pipe(env)} in "
                           f"{wait_s:.0f} s: drop --mps")
        log(f"sweep: CUDA MPS daemon of this sweep started (pipes in {env['CUDA_MPS_PIPE_DIRECTORY']})")
        yield env
    finally:
        if os.path.exists(control_pipe(env)):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run([exe], input="quit\n", env=full, capture_output=True, text=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
