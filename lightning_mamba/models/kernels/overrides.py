"""A module setting changed for the length of a block, so that a benchmark can time both choices in one process."""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Any


@contextlib.contextmanager
def overridden(module: ModuleType, name: str, value: Any):
    """Inside the block ``module.name`` is ``value``; after it (an exception too) what it was."""
    before = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, before)
