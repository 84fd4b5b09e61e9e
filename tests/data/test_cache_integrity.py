"""Token caches are checked whole at every open: damage anywhere in the file (not only at its ends), ids outside the
vocabulary and a cache of the other split are rebuilt with one warning; killed writes leave no temporary files for
long; a damaged Arrow copy of local files is rebuilt rather than blamed on the source."""

import glob
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from lightning_mamba.data import DataError, TextDataModule, load_or_build, open_token_cache, write_token_cache
from lightning_mamba.data.cache import STALE_TEMPORARY_SECONDS, read_sidecar, sidecar_path

VOCAB = 8192


@pytest.fixture
def tokens():
    # 4 MiB of uint16 ids: the middle is far from either end
    return np.random.default_rng(0).integers(0, VOCAB, size=2 << 20, dtype=np.uint16)


def rebuild(path, tokens, vocab_size=VOCAB):
    """load_or_build with the warnings it gives, the tokens it returns and whether it called build."""
    built = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        more = {} if vocab_size is None else {"vocab_size": vocab_size}
        out = load_or_build(path, "key", lambda: built.append(1) or tokens, **more)
    return out, [str(w.message) for w in caught], bool(built)


@pytest.mark.parametrize("ids", [b"\xff\xff", b"\x07\x00"], ids=["out_of_range", "valid"])
def test_damage_in_the_middle_is_found_and_rebuilt_with_one_warning(tmp_path, tokens, ids):
    path = str(tmp_path / "t.npy")
    write_token_cache(path, tokens, "key")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(ids * 4)  # 0xffff is no id of the vocabulary; 7 is, but not the token that was there
    assert open_token_cache(path, "key") is None
    out, messages, built = rebuild(path, tokens, vocab_size=None)
    assert built and len(messages) == 1 and "is damaged" in messages[0] and "\n" not in messages[0]
    np.testing.assert_array_equal(out, tokens)
    assert rebuild(path, tokens, vocab_size=None)[1:] == ([], False)  # rebuilt for good: the next run uses it silently


def test_ids_outside_the_vocabulary_are_not_used(tmp_path, tokens):
    """A cache whose file and sidecar agree but whose ids do not fit the tokenizer's vocabulary (a tokenizer that
    changed under the same fingerprint) is rebuilt instead of failing deep in the embedding."""
    path = str(tmp_path / "t.npy")
    write_token_cache(path, tokens, "key")
    assert read_sidecar(path)["max_id"] == int(tokens.max())
    assert open_token_cache(path, "key", VOCAB) is not None
    assert open_token_cache(path, "key", 1000) is None
    small = tokens % 1000
    out, messages, built = rebuild(path, small, vocab_size=1000)
    assert built and len(messages) == 1 and "outside the vocabulary of 1000" in messages[0]
    np.testing.assert_array_equal(out, small)


def test_a_build_with_ids_outside_the_vocabulary_is_refused(tmp_path, tokens):
    with pytest.raises(DataError, match=r"token id \d+, outside the tokenizer's vocabulary of 1000: fix data\.tokenizer"):
        load_or_build(str(tmp_path / "t.npy"), "key", lambda: tokens, 1000)
    assert not os.path.exists(tmp_path / "t.npy")


def test_a_missing_or_older_cache_is_built_without_a_warning(tmp_path, tokens):
    path = str(tmp_path / "t.npy")
    assert rebuild(path, tokens)[1:] == ([], True)
    meta = read_sidecar(path)
    with open(sidecar_path(path), "w") as f:  # as format 1 wrote it
        f.write('{"format": 1, "fingerprint": "key"}')
    assert rebuild(path, tokens)[1:] == ([], True)
    assert read_sidecar(path) == meta


def test_swapped_train_and_val_caches_are_rebuilt(text_dir, tmp_path):
    settings = dict(source=text_dir, tokenizer="byte", seq_len=64, batch_size=4, val_fraction=0.2,
                    cache_dir=str(tmp_path / "cache"))
    dm = TextDataModule(**settings)
    dm.prepare_data()
    train, val = np.array(dm.train_tokens()), np.array(dm.val_tokens())
    for suffix in (".npy", ".json"):  # swap the files, sidecars included
        a, b = (os.path.splitext(dm.cache_path(s))[0] + suffix for s in ("train", "val"))
        os.rename(a, a + ".swap")
        os.rename(b, a)
        os.rename(a + ".swap", b)
    with pytest.warns(UserWarning, match="made for other settings or the other split"):
        again = TextDataModule(**settings)
        again.prepare_data()
    np.testing.assert_array_equal(again.train_tokens(), train)
    np.testing.assert_array_equal(again.val_tokens(), val)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_files_of_killed_writes_are_removed(tmp_path, tokens):
    path = str(tmp_path / "t.npy")
    old = time.time() - STALE_TEMPORARY_SECONDS - 10
    gone, running, fresh = (str(tmp_path / f".{name}.{pid}.abcd1234.tmp") for name, pid in
                            (("t.npy", dead_pid()), ("t.json", os.getpid()), ("t.npy", dead_pid())))
    other = str(tmp_path / f".other.npy.{dead_pid()}.abcd1234.tmp")  # another cache's: not this call's business
    for tmp in (gone, running, fresh, other):
        with open(tmp, "wb") as f:
            f.write(b"half a cache")
        if tmp != fresh:
            os.utime(tmp, (old, old))
    load_or_build(path, "key", lambda: tokens)
    left = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / ".*.tmp")))
    # the writer is gone: removed; alive (this process), or written to a moment ago (maybe by another machine
    # sharing the folder): kept
    assert left == sorted(os.path.basename(p) for p in (running, fresh, other))


def test_a_damaged_arrow_copy_is_rebuilt_not_blamed_on_the_source(tmp_path):
    pytest.importorskip("datasets")
    from lightning_mamba.data.sources import load_local

    src, hf_cache = tmp_path / "texts", str(tmp_path / "cache" / "hf_datasets")
    src.mkdir()
    for i in range(3):
        (src / f"doc{i}.txt").write_text(f"document {i} " * 500)
    docs = load_local(str(src), hf_cache_dir=hf_cache)
    arrows = glob.glob(os.path.join(hf_cache, "**", "*.arrow"), recursive=True)
    assert arrows
    for arrow in arrows:
        os.truncate(arrow, os.path.getsize(arrow) // 2)
    with pytest.warns(UserWarning, match="its Arrow copy under .* did not read .*: rebuilt it from the files"):
        assert load_local(str(src), hf_cache_dir=hf_cache) == docs
    assert load_local(str(src), hf_cache_dir=hf_cache) == docs  # and the copy is whole again


def test_a_malformed_source_is_still_blamed_on_the_source(tmp_path):
    pytest.importorskip("datasets")
    from lightning_mamba.data.sources import load_local

    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(DataError, match="cannot read its json files"):
        load_local(str(tmp_path / "bad.jsonl"), hf_cache_dir=str(tmp_path / "hf_datasets"))
