import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a 2-core machine: one intra-op thread avoids OpenMP threads spin-waiting on each other
    when other processes compete (measured ~7x faster then), and is no slower otherwise."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def corpus(tmp_path):
    """A small local text corpus (12 documents of random words) for end-to-end CLI runs."""
    d = tmp_path / "texts"
    d.mkdir()
    words = "the quick brown fox jumps over the lazy dog and then it rests a while".split()
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        idx = torch.randint(0, len(words), (400,), generator=g).tolist()
        (d / f"doc{i}.txt").write_text(" ".join(words[j] for j in idx) + ".\n")
    return str(d)
