import os

import numpy as np
import pytest

from lightning_mamba.data import fingerprint, load_or_build, open_token_cache, token_dtype, write_token_cache
from lightning_mamba.data.cache import CHECKSUM_SPAN, atomic_write, sidecar_path


@pytest.fixture
def tokens():
    # larger than two checksum spans, so the unchecked middle exists
    return np.random.default_rng(0).integers(0, 8192, size=CHECKSUM_SPAN + 1000, dtype=np.uint16)


def test_round_trip_is_a_read_only_memory_map(tmp_path, tokens):
    path = str(tmp_path / "t.npy")
    write_token_cache(path, tokens, "key")
    opened = open_token_cache(path, "key")
    assert isinstance(opened, np.memmap) and not opened.flags.writeable
    np.testing.assert_array_equal(opened, tokens)
    assert opened.dtype == np.uint16


def test_dtype_follows_the_vocabulary():
    assert token_dtype(257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(50280) == np.uint16


def test_fingerprint_is_stable_and_sensitive():
    a = fingerprint({"source": "x", "files": [["a", 1]]}, "bpe", 1)
    assert a == fingerprint({"files": [["a", 1]], "source": "x"}, "bpe", 1)  # key order does not matter
    assert a != fingerprint({"source": "x", "files": [["a", 2]]}, "bpe", 1)
    assert a != fingerprint({"source": "x", "files": [["a", 1]]}, "byte", 1)


def test_second_build_reuses_the_cache(tmp_path, tokens):
    path, builds = str(tmp_path / "t.npy"), []

    def build():
        builds.append(1)
        return tokens

    load_or_build(path, "key", build)
    mtime = os.stat(path).st_mtime_ns
    np.testing.assert_array_equal(load_or_build(path, "key", build), tokens)
    assert len(builds) == 1 and os.stat(path).st_mtime_ns == mtime
    load_or_build(path, "other settings", build)  # another fingerprint: rebuilt
    assert len(builds) == 2


@pytest.mark.parametrize("damage", ["truncate", "append", "overwrite_head", "overwrite_tail", "sidecar", "no_sidecar"])
def test_damaged_cache_is_rebuilt_not_used(tmp_path, tokens, damage):
    path = str(tmp_path / "t.npy")
    write_token_cache(path, tokens, "key")
    size = os.path.getsize(path)
    if damage == "truncate":
        os.truncate(path, size - 2)
    elif damage == "append":
        with open(path, "ab") as f:
            f.write(b"\0\0")
    elif damage in ("overwrite_head", "overwrite_tail"):
        with open(path, "r+b") as f:
            f.seek(200 if damage == "overwrite_head" else size - 2)
            f.write(b"\xff\xfe")
    elif damage == "sidecar":
        with open(sidecar_path(path), "w") as f:
            f.write('{"fingerprint": "key", "tok')
    else:
        os.remove(sidecar_path(path))
    assert open_token_cache(path, "key") is None
    rebuilt = load_or_build(path, "key", lambda: tokens)
    np.testing.assert_array_equal(rebuilt, tokens)


def test_foreign_file_is_not_used(tmp_path, tokens):
    path = str(tmp_path / "t.npy")
    write_token_cache(path, tokens, "key")
    np.save(path, tokens[::-1].copy())  # same size and dtype, other content
    assert open_token_cache(path, "key") is None


def test_atomic_write_leaves_no_temporary_files(tmp_path, tokens):
    path = str(tmp_path / "t.npy")
    write_token_cache(path, tokens, "key")
    write_token_cache(path, tokens[:10], "key2")  # overwrite
    assert sorted(os.listdir(tmp_path)) == ["t.json", "t.npy"]

    def fail_midway(f):
        f.write(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):  # a failed write keeps the old file, leaves nothing behind
        atomic_write(path, fail_midway)
    assert sorted(os.listdir(tmp_path)) == ["t.json", "t.npy"]
    np.testing.assert_array_equal(open_token_cache(path, "key2"), tokens[:10])
