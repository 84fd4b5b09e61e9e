"""Token caches on disk: a flat ``.npy`` token array, memory-mapped, with a JSON sidecar that vouches for it.

A cache is used only when its sidecar's fingerprint matches the settings that would rebuild it and the
array passes the checks in :func:`open_token_cache` (exact size, a hash of every token, every id inside the
vocabulary); otherwise it is rebuilt, never trusted, with a warning when it was damaged rather than missing
or stale. Files are written atomically (temporary file in the same folder, fsync, ``os.replace``), so a
crash or a concurrent writer leaves either the old file or the new one, never half of one; the sidecar is
written last. The temporary files of a killed writer are deleted by the next :func:`load_or_build`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable

import numpy as np

from ..atomic import atomic_write, atomic_write_json, remove_stale_temporaries, unwritable_dir
from ..errors import DiskFullError, is_disk_full
from .errors import DataError

CACHE_FORMAT = 2  # 2: the checksum covers every token (format 1 hashed the first and last CHECKSUM_SPAN bytes)
CHECKSUM_SPAN = 1 << 20
# The whole array is hashed at every open, in blocks of this many bytes: blake2b reads ~1 GB/s, so a 100 MB cache
# costs ~0.1 s; a sampled hash missed damage in the middle (out-of-range ids, or silently wrong tokens).
HASH_BLOCK = 8 << 20
STALE_TEMPORARY_SECONDS = 60  # a temporary file untouched this long whose writer is gone is a killed write's


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able ``parts`` (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=10).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id (< vocab_size) fits, else uint32: half the disk and page cache."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def sidecar_path(path: str) -> str:
    return os.path.splitext(path)[0] + ".json"


def scan_tokens(tokens: np.ndarray) -> tuple[str, int]:
    """(blake2b of the token count and all token bytes, the largest id or -1), in one pass of ``HASH_BLOCK`` blocks."""
    flat = tokens.reshape(-1)
    h = hashlib.blake2b(digest_size=16)
    h.update(str(len(flat)).encode())
    step, top = HASH_BLOCK // flat.itemsize, -1
    for start in range(0, len(flat), step):
        block = np.ascontiguousarray(flat[start:start + step])
        h.update(block.view(np.uint8))
        top = max(top, int(block.max()))
    return h.hexdigest(), top


def write_token_cache(path: str, tokens: np.ndarray, key: str, vocab_size: int | None = None) -> None:
    """Write ``tokens`` (1-D, every id < ``vocab_size`` if given) to ``path`` (.npy) and its sidecar, both
    atomically, the sidecar last."""
    tokens = np.ascontiguousarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"a token cache is a flat array, got shape {tokens.shape}")
    checksum, top = scan_tokens(tokens)
    if vocab_size is not None and top >= vocab_size:
        raise DataError(f"tokenizing gave token id {top}, outside the tokenizer's vocabulary of {vocab_size}: "
                        f"fix data.tokenizer (its ids must be below its vocab_size)")
    meta = {"format": CACHE_FORMAT, "fingerprint": key, "dtype": tokens.dtype.str, "tokens": int(len(tokens)),
            "checksum": checksum, "max_id": top}
    try:
        atomic_write(path, lambda f: np.save(f, tokens, allow_pickle=False))
        atomic_write_json(sidecar_path(path), meta, indent=1)
    except OSError as e:
        raise cache_write_error(e, path) from e


def cache_write_error(e: OSError, path: str) -> DataError | DiskFullError:
    """A failed write under data.cache_dir as one line that names the file and data.cache_dir (not data.source)."""
    if is_disk_full(e):
        return DiskFullError(path, "data.cache_dir")
    return DataError(f"cannot write {getattr(e, 'filename', None) or path} ({e.strerror or e}): set data.cache_dir to "
                     f"a writable folder")


def check_cache_dir(cache_dir: str) -> None:
    """data.cache_dir must take files (checked before slow work whose result goes there): one line if not."""
    why = unwritable_dir(cache_dir)
    if why:
        raise DataError(f"data.cache_dir {cache_dir} is not a writable folder ({why}): set data.cache_dir to one")


def read_sidecar(path: str) -> dict | None:
    try:
        with open(sidecar_path(path), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def check_token_cache(path: str, key: str, vocab_size: int | None = None) -> tuple[np.ndarray | None, str | None]:
    """``(tokens, None)`` for a valid cache (a read-only memory map); else ``(None, why)``, ``why`` None when the
    cache is simply absent or of an older format, else what is wrong with it."""
    meta = read_sidecar(path)
    if meta is None:
        return None, ("its sidecar is missing or unreadable" if os.path.exists(path) else None)
    if meta.get("format") != CACHE_FORMAT:
        return None, None
    if meta.get("fingerprint") != key:
        return None, f"it was made for other settings or the other split (fingerprint {meta.get('fingerprint')})"
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:  # missing, truncated below its header's shape, or not an .npy file
        return None, f"it does not load ({type(e).__name__})"
    if not (tokens.ndim == 1 and tokens.dtype.str == meta.get("dtype") and len(tokens) == meta.get("tokens")
            and tokens.offset + tokens.nbytes == os.path.getsize(path)):  # nothing appended either
        return None, "its size, shape or dtype differs from its sidecar's"
    checksum, top = scan_tokens(tokens)
    if checksum != meta.get("checksum"):
        return None, "its tokens do not match their checksum"
    if vocab_size is not None and top >= vocab_size:
        return None, f"it holds token id {top}, outside the vocabulary of {vocab_size}"
    return tokens, None


def open_token_cache(path: str, key: str, vocab_size: int | None = None) -> np.ndarray | None:
    """The cached tokens as a read-only memory map, or None when the cache is missing, stale or damaged."""
    return check_token_cache(path, key, vocab_size)[0]




def load_or_build(path: str, key: str, build: Callable[[], np.ndarray], vocab_size: int | None = None) -> np.ndarray:
    """The cache at ``path`` if it is valid for ``key`` (and every id < ``vocab_size``), else ``build()`` written
    there and reopened; a damaged cache is rebuilt with a one-line warning."""
    for target in (path, sidecar_path(path)):
        remove_stale_temporaries(target, STALE_TEMPORARY_SECONDS)
    tokens, damage = check_token_cache(path, key, vocab_size)
    if tokens is None:
        for target in (path, sidecar_path(path)):
            if os.path.isdir(target):  # not ours to delete
                raise DataError(f"{target} is a folder where the token cache goes: move it away, or set "
                                f"data.cache_dir to another folder")
        check_cache_dir(os.path.dirname(os.path.abspath(path)))  # before tokenizing, not after
        if damage is not None:
            warnings.warn(f"token cache {path} is damaged ({damage}): rebuilding it", stacklevel=2)
        write_token_cache(path, build(), key, vocab_size)
        tokens = open_token_cache(path, key, vocab_size)
        if tokens is None:
            raise OSError(f"the token cache {path} was written but does not read back: is the disk full?")
    return tokens
