"""The code corpus: installed packages' Python files, size-filtered, deduplicated, held out by package, manifested.

Expected contents are computed here straight from each distribution's file list (importlib.metadata), not through
the module under test. The packages used are small ones this project's virtualenv always has (pytest's
dependencies iniconfig and pluggy, PyYAML, packaging) and, for deduplication, lightning and pytorch-lightning,
which ship byte-identical copies of some files."""

import importlib.metadata as md
import json
import os

import pytest

from lightning_mamba.data import CodeSettings, DataError, TextDataModule, load_code_corpus
from lightning_mamba.data.code_corpus import MAX_FILE_BYTES, MIN_FILE_BYTES


def py_files(dist_name: str, lo: int = MIN_FILE_BYTES, hi: int = MAX_FILE_BYTES) -> dict[str, str]:
    """relpath -> text of the distribution's .py files of lo..hi bytes."""
    dist = md.distribution(dist_name)
    out = {}
    for entry in dist.files:
        path = dist.locate_file(entry)
        if str(entry).endswith(".py") and path.is_file() and lo <= path.stat().st_size <= hi:
            out[str(entry)] = path.read_bytes().decode("utf-8", errors="replace")
    return out


def side(name: str, files: dict[str, str]) -> dict:
    return {"name": md.distribution(name).metadata["Name"], "version": md.version(name), "files": len(files),
            "bytes": sum(len(t.encode()) for t in files.values())}


def test_named_split_manifest_and_size_floor():
    corpus = load_code_corpus(CodeSettings(packages=("iniconfig",), val_packages=("pluggy",)))
    ini, plug = py_files("iniconfig"), py_files("pluggy")
    m = corpus.manifest
    assert m["source"] == "code" and m["split"] == "named packages" and m["python"]
    assert m["train"]["distributions"] == [side("iniconfig", ini)]
    assert m["val"]["distributions"] == [side("pluggy", plug)]
    assert (m["train"]["files"], m["val"]["files"]) == (len(ini), len(plug))
    assert sorted(corpus.documents["train"]) == sorted(ini.values())
    assert sorted(corpus.documents["val"]) == sorted(plug.values())
    small = {**py_files("iniconfig", 1, MIN_FILE_BYTES - 1), **py_files("pluggy", 1, MIN_FILE_BYTES - 1)}
    assert small, "iniconfig and pluggy ship .py files under 1 KiB (the floor's test needs some)"
    assert m["skipped_files"]["below_min_file_bytes"] == len(small)
    assert not set(small.values()) & set(corpus.documents["train"] + corpus.documents["val"])
    assert m["settings"]["val_packages"] == ["pluggy"] and m["settings"]["min_file_bytes"] == MIN_FILE_BYTES
    assert json.loads(json.dumps(m)) == m  # plain JSON
    # the content hash names the exact content: the same build gives it again, another floor changes it
    assert load_code_corpus(CodeSettings(packages=("iniconfig",), val_packages=("pluggy",))).manifest == m
    lower = load_code_corpus(CodeSettings(packages=("iniconfig",), val_packages=("pluggy",), min_file_bytes=100))
    assert lower.manifest["content_hash"] != m["content_hash"]
    assert lower.manifest["train"]["files"] > m["train"]["files"]


def test_import_names_resolve_to_their_distribution():
    corpus = load_code_corpus(CodeSettings(packages=("yaml",), val_packages=("pluggy",)))
    assert [d["name"] for d in corpus.manifest["train"]["distributions"]] == ["PyYAML"]


def test_hashed_split_keeps_each_package_on_one_side():
    names = ("iniconfig", "pluggy", "packaging", "PyYAML")
    corpus = load_code_corpus(CodeSettings(packages=names, val_fraction=0.3))
    train, val = set(corpus.documents["train"]), set(corpus.documents["val"])
    assert train and val
    sides = {}
    for name in names:
        texts = set(py_files(name).values())
        assert texts <= train or texts <= val, f"{name} is split across train and val"
        sides[name] = "train" if texts <= train else "val"
    m = corpus.manifest
    assert m["split"] == "hashed by package name"
    assert {d["name"] for d in m["val"]["distributions"]} == {md.distribution(n).metadata["Name"]
                                                              for n, s in sides.items() if s == "val"}
    # a package's side depends on its name and the seed only, not on which other packages take part
    for name, where in sides.items():
        others = [n for n in names if n != name][:1]
        alone = load_code_corpus(CodeSettings(packages=(name, *others), val_fraction=0.3))
        if sides[others[0]] != where:  # two packages on different sides: both keep their side
            assert set(py_files(name).values()) <= set(alone.documents[where])


def test_duplicate_content_is_kept_once_and_held_out_first():
    held, trained = py_files("lightning"), py_files("pytorch-lightning")
    shared = set(held.values()) & set(trained.values())
    assert shared, "lightning and pytorch-lightning ship byte-identical files (the dedupe test needs some)"
    corpus = load_code_corpus(CodeSettings(packages=("pytorch-lightning",), val_packages=("lightning",)))
    train, val = corpus.documents["train"], corpus.documents["val"]
    assert len(set(train + val)) == len(train + val)  # no content twice
    assert set(val) == set(held.values())  # held out first: the shared files stay held out ...
    assert set(train) == set(trained.values()) - shared  # ... and are not trained on
    dupes = (len(held) - len(set(held.values()))) + (len(trained) - len(set(trained.values()) - shared))
    assert corpus.manifest["skipped_files"]["duplicates"] == dupes


def test_max_bytes_caps_each_side():
    settings = CodeSettings(packages=("packaging", "PyYAML"), val_packages=("pluggy",), max_bytes=60_000,
                            val_fraction=0.25)
    m = load_code_corpus(settings).manifest
    assert 0 < m["val"]["bytes"] <= 15_000 and 0 < m["train"]["bytes"] <= 45_000
    assert m["skipped_files"]["over_max_bytes"] > 0
    full = load_code_corpus(CodeSettings(packages=("packaging", "PyYAML"), val_packages=("pluggy",))).manifest
    assert full["train"]["bytes"] > 100_000


@pytest.mark.parametrize("settings,fragment", [
    (dict(packages=("nummpy",)), "'nummpy' is not a distribution installed for this interpreter (did you mean numpy"),
    (dict(packages=("iniconfig",), val_packages=("no-such-package-xyz",)), "data.code_val_packages: 'no-such-package"),
    (dict(packages=("lightning_mamba", "pluggy")), "editable install"),
    (dict(packages=("iniconfig",), val_packages=("pluggy",), min_file_bytes=300_000), "has no .py file of 300000"),
    (dict(packages=("iniconfig",)), "needs at least 2 packages"),
    (dict(packages=("iniconfig",), val_packages=("iniconfig",)), "holds out every package"),
    (dict(packages=("iniconfig",), val_packages=("pluggy",), max_bytes=8000), "the held-out packages give no Python"),
    (dict(packages=()), "data.code_packages is an empty list"),
    (dict(packages="numpy"), "must be a list of package names"),
    (dict(max_file_bytes=10), "below data.code_min_file_bytes"),
])
def test_bad_settings_are_one_clear_line(settings, fragment):
    with pytest.raises(DataError) as e:
        load_code_corpus(CodeSettings(**settings))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_datamodule_writes_manifest_beside_its_caches_and_reuses_both(tmp_path):
    settings = dict(source="code", tokenizer="byte", seq_len=32, batch_size=2, cache_dir=str(tmp_path / "cache"),
                    code_packages=["iniconfig"], code_val_packages=["pluggy"])
    dm = TextDataModule(**settings)
    dm.prepare_data()
    m = dm.corpus_manifest
    path = dm.manifest_path()
    assert os.path.dirname(path) == str(tmp_path / "cache") and os.path.basename(path).startswith("tokens-")
    with open(path) as f:
        assert json.load(f) == m
    assert m["tokens"] == {"train": len(dm.train_tokens()), "val": len(dm.val_tokens())}
    assert m["tokenizer"] == "byte" and m["train"]["bytes"] + m["train"]["files"] == m["tokens"]["train"]  # + EOS each
    assert dm.state_dict()["corpus_manifest"] == m  # stored in checkpoints

    again = TextDataModule(**settings)
    again.setup("fit")
    assert again._documents is None and again.corpus_manifest == m  # caches and manifest came from disk
    os.unlink(path)
    third = TextDataModule(**settings)
    assert third.corpus_manifest == m  # a lost manifest is rebuilt (from the files, the caches are kept)
    assert TextDataModule(**{**settings, "code_max_bytes": 4000}).stream_key != dm.stream_key


def test_code_settings_need_source_code(tmp_path):
    with pytest.raises(DataError, match="data.code_packages applies to data.source code only"):
        TextDataModule(source="default", tokenizer="byte", code_packages=["numpy"], cache_dir=str(tmp_path))
