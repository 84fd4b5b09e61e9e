import os

import pytest

from lightning_mamba.data import default_corpus_documents


@pytest.fixture(scope="session")
def corpus_documents() -> list[str]:
    """The embedded corpus, loaded once for the whole session (~0.5 s)."""
    return default_corpus_documents()


@pytest.fixture(scope="session")
def sample_documents(corpus_documents) -> list[str]:
    """~300 KB of real text: a 10 KB slice of each of 30 corpus documents (plays and books)."""
    picks = corpus_documents[::3][:30]
    return [doc[:10_000] for doc in picks]


@pytest.fixture
def text_dir(tmp_path, sample_documents) -> str:
    """A folder of .txt files, one document each (in a sub-folder too, to exercise recursion)."""
    root = tmp_path / "corpus"
    for i, doc in enumerate(sample_documents):
        folder = root / ("part2" if i >= 20 else "part1")
        os.makedirs(folder, exist_ok=True)
        (folder / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    return str(root)
