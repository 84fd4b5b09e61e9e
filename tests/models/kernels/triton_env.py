"""Where the Triton-kernel tests run: CUDA when available, else Triton's CPU interpreter when TRITON_INTERPRET=1
(small shapes), else they skip (CI has no triton). The CUDA-only ones (realistic shapes, mamba_ssm) carry
``pytest.mark.gpu`` besides ``needs_triton``: tests/conftest.py skips them without CUDA."""

import os

import pytest
import torch


def _device() -> tuple[str | None, str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return None, "triton is not installed"
    if torch.cuda.is_available():
        return "cuda", ""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu", ""
    return None, "no CUDA, and TRITON_INTERPRET=1 is not set for Triton's CPU interpreter"


DEVICE, WHY_NOT = _device()
needs_triton = pytest.mark.skipif(DEVICE is None, reason=WHY_NOT or "")


@pytest.fixture
def mamba_kernels(monkeypatch):
    """mamba_ssm's Triton SSD kernels where a test can run them, as backend.py reaches them (its module
    ``mamba_ssm.ops.triton.ssd_combined`` is returned); skips elsewhere.

    On CUDA: as installed. On the CPU, under Triton's interpreter (TRITON_INTERPRET=1), with three allowances made
    here and undone after the test: the package's ``__init__`` is not run (it imports the Mamba-1 CUDA extension and
    transformers; the SSD modules need neither), each autotuned kernel keeps only its first config (the autotuner
    times its configs on a GPU), ``torch.cuda.device`` is a no-op for CPU tensors and the SM count a backward splits
its work by is 4. The interpreter also needs
    numpy < 2.4 here: mamba_ssm's loops have run-time bounds, which it cannot run under numpy >= 2.4. So, on a CPU
    machine: TRITON_INTERPRET=1 with triton, einops, numpy < 2.4 and mamba-ssm's pure-Python build importable."""
    import contextlib
    import importlib
    import importlib.util
    import sys
    import types

    if DEVICE is None:
        pytest.skip(WHY_NOT)
    if DEVICE == "cpu":
        import numpy

        if tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 4):
            pytest.skip(f"mamba_ssm's kernels need numpy < 2.4 in Triton's interpreter (numpy {numpy.__version__})")
        if "mamba_ssm" not in sys.modules:
            spec = importlib.util.find_spec("mamba_ssm")
            if spec is None:
                pytest.skip("mamba_ssm is not installed")
            package = types.ModuleType("mamba_ssm")  # its modules' search path, without running its __init__
            package.__path__ = list(spec.submodule_search_locations)
            monkeypatch.setitem(sys.modules, "mamba_ssm", package)
        monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
        # some of the backwards split their work by the SM count: any count gives the same result
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
            multi_processor_count=4, name="Triton's CPU interpreter"))
    if "selective_scan_cuda" not in sys.modules:  # an empty placeholder for the Mamba-1 extension, as backend.py does
        monkeypatch.setitem(sys.modules, "selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    try:
        combined = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    except Exception as e:  # not installed, or a broken install
        pytest.skip(f"mamba_ssm's SSD kernels do not import ({type(e).__name__}: {e})")
    if DEVICE == "cpu":
        import triton

        for name in ("ssd_chunk_state", "ssd_state_passing", "ssd_bmm", "ssd_chunk_scan", "ssd_combined"):
            module = importlib.import_module(f"mamba_ssm.ops.triton.{name}")
            for kernel in vars(module).values():
                if isinstance(kernel, triton.runtime.autotuner.Autotuner):
                    monkeypatch.setattr(kernel, "configs", kernel.configs[:1])
    return combined
