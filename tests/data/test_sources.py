import json

import pandas as pd
import pytest

from lightning_mamba.data import DataError, load_documents, source_identity


def load(source, tmp_path, **kw):
    return load_documents(str(source), hf_cache_dir=str(tmp_path / "hf"), **kw)


def test_txt_files_are_one_document_each(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond paragraph\n")
    assert load(tmp_path / "a.txt", tmp_path) == ["first line\n\nsecond paragraph\n"]


def test_jsonl_and_parquet_records_are_documents(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate("xyz")))
    assert load(tmp_path / "d.jsonl", tmp_path, text_field="body") == ["x", "y", "z"]
    pd.DataFrame({"text": ["p one", "", "p two"]}).to_parquet(tmp_path / "d.parquet")
    assert load(tmp_path / "d.parquet", tmp_path) == ["p one", "p two"]  # empty documents are dropped


def test_missing_text_field_names_the_setting(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="no 'text' field.*data.text_field"):
        load(tmp_path / "d.jsonl", tmp_path)


def test_directories_recurse_in_sorted_order_and_skip_other_files(tmp_path):
    root = tmp_path / "src"
    (root / "b" / "deeper").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "a.txt").write_text("A")
    (root / "b" / "deeper" / "c.txt").write_text("C")
    (root / "b" / "b.jsonl").write_text('{"text": "B"}\n')
    (root / ".git" / "x.txt").write_text("hidden")
    (root / "table.csv").write_text("not,loaded")
    assert load(root, tmp_path) == ["A", "C", "B"]  # text files first, then json records
    ids = source_identity(str(root))
    assert [f[0].rsplit("/", 1)[1] for f in ids["files"]] == ["a.txt", "b.jsonl", "c.txt"]


def test_symlinked_folders_are_followed_once(tmp_path):
    """A corpus folder assembled from links: a linked folder's files are documents (os.walk skipped them silently),
    a link back up does not loop, and a folder reached twice is read once."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "s1.txt").write_text("S1")
    (shared / "s2.txt").write_text("S2")
    root = tmp_path / "src"
    root.mkdir()
    (root / "a.txt").write_text("A")
    (root / "linked").symlink_to(shared, target_is_directory=True)
    (root / "again").symlink_to(shared, target_is_directory=True)
    (shared / "up").symlink_to(root, target_is_directory=True)  # a loop
    assert load(root, tmp_path) == ["A", "S1", "S2"]
    ids = source_identity(str(root))
    assert [f[0].rsplit("/", 1)[1] for f in ids["files"]] == ["a.txt", "s1.txt", "s2.txt"]


def test_non_utf8_bytes_are_replaced(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    assert load(tmp_path / "latin1.txt", tmp_path) == ["caf\ufffd au lait"]


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}/nope does not exist"):
        load(tmp_path / "nope", tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_documents("./no/such/corpus.txt")
    (tmp_path / "a.txt").write_text("some text")  # a pattern that a shell would have matched: not expanded here
    with pytest.raises(DataError, match=r"\*\.txt does not exist \(patterns are not expanded\): give a file, or the "
                                        r"directory holding the files"):
        load_documents(f"{tmp_path}/*.txt")


def test_empty_sources_fail(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .* files in this directory"):
        load(tmp_path / "empty", tmp_path)
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(DataError, match="no non-empty documents"):
        load(tmp_path / "blank.txt", tmp_path)


def test_unreachable_hub_fails_fast_with_a_hint():
    # This machine is offline (without network the check fails at name resolution, in milliseconds);
    # online, the made-up name fails as unknown. Either way: one line pointing at local files.
    with pytest.raises(DataError, match="local file or directory"):
        load_documents("lightning-mamba-tests/no-such-dataset")


def test_the_cache_folders_readme_is_no_document(tmp_path):
    """data/ (the default cache_dir) holds the repo's README.md on what the folder is: texts kept there read it as a
    document, and data.source pointed at the cache folder itself trained on that README."""
    from lightning_mamba.data.sources import local_files

    cache = tmp_path / "data"
    cache.mkdir()
    (cache / "README.md").write_text("Token caches are written here.\n")
    (cache / "tokens-0123abcd-train.npy").write_bytes(b"")
    with pytest.raises(DataError, match=r"^data.source .* is the cache folder \(data.cache_dir\).*point data.source"):
        local_files(str(cache), cache_dir=str(cache))
    (cache / "notes.txt").write_text("The user's own text.\n")
    assert local_files(str(cache), cache_dir=str(cache)) == [str(cache / "notes.txt")]
    # elsewhere a README.md is a document like any other
    other = tmp_path / "corpus"
    other.mkdir()
    (other / "README.md").write_text("A text.\n")
    assert local_files(str(other), cache_dir=str(cache)) == [str(other / "README.md")]
