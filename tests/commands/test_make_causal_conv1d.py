"""`make causal-conv1d` (the GPU node's build of the causal-conv1d sdist, README "Offline GPU nodes") refuses bad
input in one line before it unpacks or builds anything. The build itself needs CUDA: it runs on the GPU node."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(cwd, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "CUDA_ARCH")}
    return subprocess.run(["make", "--no-print-directory", "-s", "-f", os.path.join(REPO, "Makefile"), "causal-conv1d",
                           *args], cwd=cwd, capture_output=True, text=True, env=env)


@pytest.mark.parametrize("arch", ["abc", "9.0", "sm_90", ""])
def test_an_architecture_that_is_no_compute_capability_is_refused(tmp_path, arch):
    r = make(tmp_path, f"CUDA_ARCH={arch}")
    assert r.returncode != 0
    assert r.stdout.strip() == (f"CUDA_ARCH={arch} is no compute capability: give its digits, e.g. "
                                "make causal-conv1d CUDA_ARCH=90")
    assert os.listdir(tmp_path) == []


def test_without_the_wheelhouse_it_says_where_the_sdist_comes_from(tmp_path):
    r = make(tmp_path, "CUDA_ARCH=90")
    assert r.returncode != 0
    assert r.stdout.strip() == ("wheelhouse/causal_conv1d-1.7.0.tar.gz is missing: run make wheelhouse where PyPI is "
                                "reachable and copy wheelhouse/ here")
    assert os.listdir(tmp_path) == []


@pytest.fixture
def sdist(tmp_path):
    """A folder holding wheelhouse/ with the sdist's name (the checks before the build do not open it)."""
    (tmp_path / "wheelhouse").mkdir()
    (tmp_path / "wheelhouse" / "causal_conv1d-1.7.0.tar.gz").write_bytes(b"")
    return tmp_path


def test_an_interpreter_without_torch_is_refused(sdist):
    no_torch = sdist / "python"
    no_torch.write_text("#!/bin/sh\nexit 1\n")  # an interpreter whose `import torch` fails
    no_torch.chmod(0o755)
    r = make(sdist, "CUDA_ARCH=90", f"PYTHON={no_torch}")
    assert r.returncode != 0
    assert r.stdout.strip() == (f"PYTHON={no_torch} cannot import torch: give the interpreter that holds the node's "
                                "torch, e.g. make causal-conv1d PYTHON=/path/to/venv/bin/python")


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is a CUDA build")
def test_a_cpu_build_of_torch_is_refused(sdist):
    r = make(sdist, "CUDA_ARCH=90", f"PYTHON={sys.executable}")
    assert r.returncode != 0
    assert r.stdout.strip() == (f"PYTHON={sys.executable} holds a CPU build of torch: give the interpreter that holds "
                                "the node's CUDA build")
    assert sorted(os.listdir(sdist)) == ["wheelhouse"]
