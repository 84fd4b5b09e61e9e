"""Token caches on disk: a flat ``.npy`` token array, memory-mapped, with a JSON sidecar that vouches for it.

A cache is used only when its sidecar's fingerprint matches the settings that would rebuild it and the
array passes the checks in :func:`open_token_cache`; otherwise it is rebuilt, never trusted. Files are
written atomically (temporary file in the same folder, fsync, ``os.replace``), so a crash or a concurrent
writer leaves either the old file or the new one, never half of one; the sidecar is written last.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

import numpy as np

from ..atomic import atomic_write, atomic_write_json

CACHE_FORMAT = 1
# The checksum covers the first and last MiB of the token bytes, not all of them: a full hash would read
# the whole file at every start (gigabytes for a large corpus). Truncation, a foreign file and a partial
# write are caught by the exact size and fingerprint checks plus this sample; silent corruption in the
# middle of an otherwise intact file is not, which is the trade made here.
CHECKSUM_SPAN = 1 << 20


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able ``parts`` (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=10).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id (< vocab_size) fits, else uint32: half the disk and page cache."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def sidecar_path(path: str) -> str:
    return os.path.splitext(path)[0] + ".json"


def sample_checksum(tokens: np.ndarray) -> str:
    """blake2b of the token count and the first and last ``CHECKSUM_SPAN`` bytes of the tokens."""
    raw = np.ascontiguousarray(tokens).reshape(-1).view(np.uint8)
    h = hashlib.blake2b(digest_size=16)
    h.update(str(len(tokens)).encode())
    h.update(raw[:CHECKSUM_SPAN].tobytes())
    h.update(raw[-CHECKSUM_SPAN:].tobytes())
    return h.hexdigest()


def write_token_cache(path: str, tokens: np.ndarray, key: str) -> None:
    """Write ``tokens`` (1-D) to ``path`` (.npy) and its sidecar, both atomically, the sidecar last."""
    tokens = np.ascontiguousarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"a token cache is a flat array, got shape {tokens.shape}")
    atomic_write(path, lambda f: np.save(f, tokens, allow_pickle=False))
    meta = {"format": CACHE_FORMAT, "fingerprint": key, "dtype": tokens.dtype.str, "tokens": int(len(tokens)),
            "checksum": sample_checksum(tokens), "checksum_covers": f"first and last {CHECKSUM_SPAN} bytes"}
    atomic_write_json(sidecar_path(path), meta, indent=1)


def read_sidecar(path: str) -> dict | None:
    try:
        with open(sidecar_path(path), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def open_token_cache(path: str, key: str) -> np.ndarray | None:
    """The cached tokens as a read-only memory map, or None when the cache is missing, stale or damaged."""
    meta = read_sidecar(path)
    if meta is None or meta.get("format") != CACHE_FORMAT or meta.get("fingerprint") != key:
        return None
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):  # missing, truncated below its header's shape, or not an .npy file
        return None
    intact = (
        tokens.ndim == 1
        and tokens.dtype.str == meta.get("dtype")
        and len(tokens) == meta.get("tokens")
        and tokens.offset + tokens.nbytes == os.path.getsize(path)  # nothing appended either
        and sample_checksum(tokens) == meta.get("checksum")
    )
    return tokens if intact else None


def load_or_build(path: str, key: str, build: Callable[[], np.ndarray]) -> np.ndarray:
    """The cache at ``path`` if it is valid for ``key``, else ``build()`` written there and reopened."""
    tokens = open_token_cache(path, key)
    if tokens is None:
        write_token_cache(path, build(), key)
        tokens = open_token_cache(path, key)
        if tokens is None:
            raise OSError(f"the token cache {path} was written but does not read back: is the disk full?")
    return tokens
