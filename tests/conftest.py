import pytest
import torch

from tests.tiny import tiny_lm


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread for the whole session, set before any fixture of a narrower scope runs.

    Why session scope: pytest builds module-scoped fixtures (the exact-resume tests' uninterrupted reference runs)
    before function-scoped ones, so a per-test setting left those references on the host's default thread count
    while the runs compared with them used one thread. A CPU kernel splits a reduction by thread count, so the two
    differed in the last bit on some hosts. One thread also keeps tiny models fast on a 2-core machine when other
    processes compete (OpenMP threads spin-waiting on each other were measured ~7x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def thread_count_restored():
    """A test that changes the thread count hands the next one the session's single thread back."""
    yield
    torch.set_num_threads(1)


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


@pytest.fixture
def lm():
    """A tiny seeded Mamba-2 LM (tests/tiny.py)."""
    return tiny_lm()
