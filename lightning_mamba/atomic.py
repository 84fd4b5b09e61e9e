"""Atomic file writes: readers (and a run killed mid-write) only ever see the old file or the whole new one."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import BinaryIO


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(file)`` so that readers only ever see a complete file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # a unique name next to the target (os.replace is atomic only within one file system); opened with
    # open(), not mkstemp, so the file gets the usual umask permissions rather than 0600
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.strerror and e.filename in (None, tmp):
            e.filename, e.filename2 = path, None  # a failed write names the file it was for (e.g. disk full)
        raise
    try:  # make the rename itself durable; not every platform lets a folder be opened
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def unwritable_dir(folder: str) -> str | None:
    """Why files cannot be written into ``folder`` (created if missing), e.g. "Permission denied", or None when a file
    can be created there. (Root writes into a folder whatever its mode; a read-only file system stops it too.)"""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def file_in_the_way(folder: str) -> str | None:
    """The file that stands where ``folder``, or a folder above it, would go (so it cannot be made), as the path
    of that file in ``folder``'s own form (relative stays relative); None when ``folder`` is or can become one."""
    path = os.path.normpath(folder)
    while path and not os.path.exists(path):  # the part of it that exists
        path = os.path.dirname(path)
    return path if path and not os.path.isdir(path) else None


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str, obj, indent: int | None = None, allow_nan: bool = True,
                      float_digits: int | None = None) -> None:
    """The package's one JSON file writer: ``json.dumps(obj, indent=indent)``, written atomically. NaN/inf are
    written as ``NaN``/``Infinity`` as json does; a writer that must be strict JSON cleans first
    (``study.sweep.write_json``, ``models.checkpoint.save_pretrained``) and may pass ``allow_nan=False``: a
    non-finite float left is then a ValueError and nothing is written. ``float_digits``: write every float with at
    most that many significant digits (curves measured in float32 carry ~7; the 17 of a float64's repr make the
    evaluations along training of a study several GB)."""
    if float_digits is not None:
        obj = round_floats(obj, float_digits)
    atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=allow_nan))


def round_floats(obj, digits: int):
    """``obj`` with every float (in dicts, lists and tuples, nested) rounded to ``digits`` significant digits."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, digits) for v in obj]
    return obj


def remove_stale_temporaries(path: str, min_age_seconds: float = 0.0) -> None:
    """Delete the temporary files that killed writes of ``path`` left behind (:func:`atomic_write`'s
    ``.<name>.<pid>.<random>.tmp``) whose process is gone and that nobody wrote to for ``min_age_seconds`` (give a
    margin where the folder is shared between machines: the pid may then be another machine's)."""
    folder, name = os.path.split(os.path.abspath(path))
    for tmp in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp")):
        pid = tmp[len(os.path.join(folder, name)) + 2:].split(".")[0]
        with contextlib.suppress(OSError):
            if pid.isdigit() and not _alive(int(pid)) and time.time() - os.path.getmtime(tmp) >= min_age_seconds:
                os.remove(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # exists, owned by someone else
    return True


TEMPORARY = re.compile(r"\.(.+)\.(\d+)\.[0-9a-f]{8}\.tmp")  # atomic_write's .<name>.<pid>.<random>.tmp


def remove_stale_temporaries_in(folder: str, min_age_seconds: float = 0.0) -> None:
    """:func:`remove_stale_temporaries` for every target in ``folder`` at once: the temporary files of killed writes
    of any file there."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            m = TEMPORARY.fullmatch(name)
            if m:
                remove_stale_temporaries(os.path.join(folder, m[1]), min_age_seconds)
