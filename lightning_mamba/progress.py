"""Start and end lines, with the time taken, for the phases that would otherwise run silently (training a BPE,
tokenizing a corpus into its cache, an analysis, a mitigation search). On stderr: stdout keeps the results."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def phase(what: str) -> Iterator[None]:
    """``what ...`` now, ``what: done in N s`` when the block ends (nothing more if it raises: the error says why)."""
    note(f"{what} ...")
    t0 = time.perf_counter()
    yield
    note(f"{what}: done in {time.perf_counter() - t0:.1f} s")
