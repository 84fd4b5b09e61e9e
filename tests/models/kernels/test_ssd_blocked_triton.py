"""The blocked attention-form SSD (rows of 65 to 1024 tokens in 64-token blocks) equals ssd.ssd_quadratic plus the D
skip, values and every gradient, and the backend runs it where it should (training rows too long for one tile).

Runs on CUDA when available, else on CPU through Triton's interpreter when TRITON_INTERPRET=1, else skips (CI has
no triton); the supports() test needs triton only."""

import pytest
import torch

from .test_ssd_quadratic_triton import (
    NAMES,
    assert_equals_the_torch_form,
    assert_rel_close,
    assert_trains_as_the_torch_backend,
    make_inputs,
    reference,
    values_and_grads,
)
from .triton_env import DEVICE, needs_triton


def blocked(x, dt, A, B, C, D, seq_idx):
    from lightning_mamba.models.kernels.ssd_blocked_triton import ssd_blocked

    return ssd_blocked(x, dt, A, B, C, D=D, seq_idx=seq_idx)


@needs_triton
@pytest.mark.parametrize("b, l, h, p, g, n, docs, with_d", [
    (2, 65, 2, 16, 1, 16, False, True),     # two blocks, the second holding one token
    (2, 130, 4, 16, 2, 24, True, True),     # three blocks, two groups, documents across blocks, d_state of 24
    (1, 128, 2, 32, 1, 80, True, False),    # two full blocks, d_state not a multiple of the 64-wide steps, no D
    (1, 256, 2, 16, 1, 16, True, True),     # four blocks
    (1, 1024, 2, 16, 1, 16, True, True),    # the longest row the kernels take: sixteen blocks
])
def test_blocked_attention_form_equals_the_torch_form_in_fp32(b, l, h, p, g, n, docs, with_d):
    # grad A sums the cancelling row and column sums of every pair through cs = cumsum(dt A): at 256 tokens 4.9e-5
    # from the fp64 result, the torch form in fp32 1.7e-5 (and the one-tile kernels at 64 tokens 9.3e-6), as read
    # once on the CPU interpreter against an fp64 run of the torch form (a one-off script, not kept)
    # On CUDA the 1024-token row's y was 1.8e-5 from the torch form (cuBLAS and the kernels sum 1024 terms in other
    # orders; H200, 2026-12-05): 5x the tolerances there
    scale = 5.0 if DEVICE == "cuda" and l == 1024 else 1.0
    assert_equals_the_torch_form(blocked, (b, l, h, p, g, n), docs, with_d, grad_a_tol=1e-4, scale=scale)


@needs_triton
def test_blocked_attention_form_in_bf16_is_as_close_to_fp32_as_the_one_tile_kernels():
    """bf16 inputs: on CUDA the products of two inputs in bf16 on the tensor cores (exact) and the rest in TF32, in
    Triton's interpreter TF32 throughout (half_dots); fp32 sums; within the tolerance the one-tile kernels' bf16
    test holds."""
    x, dt, A, B, C, D, seq_idx = make_inputs(2, 96, 4, 16, 1, 64, docs=True)
    grad_y = torch.randn(2, 96, 4, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    exact, g_exact = values_and_grads(reference, (x, dt, A, B, C, D), seq_idx, grad_y)
    half = [t.to(torch.bfloat16) if t is not None and t.dim() == 4 else t for t in (x, dt, A, B, C, D)]
    y, grads = values_and_grads(blocked, half, seq_idx, grad_y.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and grads[3].dtype == torch.bfloat16 and grads[4].dtype == torch.bfloat16
    assert_rel_close(y, exact, 2e-2, "y (bf16)")
    for name, got, want in zip(NAMES, grads, g_exact):
        assert_rel_close(got, want, 3e-2, f"grad {name} (bf16)")


def test_half_inputs_multiply_as_they_are_only_on_cuda():
    """half_dots: bf16 inputs on CUDA go to the tensor cores in bf16; fp32 inputs, and any CPU tensor (Triton's
    interpreter, which multiplies half operands' bit patterns), are upcast."""
    from lightning_mamba.models.kernels.ssd_blocked_triton import half_dots

    half = torch.zeros(1, 65, 1, 16, dtype=torch.bfloat16)
    assert not half_dots(half, half, half) and not half_dots(half.float(), half.float(), half.float())
    if torch.cuda.is_available():
        half = half.cuda()
        assert half_dots(half, half, half) and not half_dots(half.float(), half.float(), half.float())
        assert not half_dots(half.float(), half, half)  # an fp32 input: the products stay in fp32


@needs_triton
def test_the_backend_takes_the_blocked_form_for_training_rows_past_one_tile(monkeypatch):
    """backend.ssd on the Triton path, rows <= quadratic_max_len, no final state: up to 64 tokens the one-tile
    kernels, then the blocked ones up to their MAX_LEN, then the torch form; a final state asked or
    quadratic_kernels("torch"): the torch form."""
    from lightning_mamba.models.kernels import backend, ssd_blocked_triton

    monkeypatch.setattr(backend, "uses_triton", lambda name, x: name != "torch")  # the Triton path, on any device

    def form(l, qml, **kw):
        x, dt, A, B, C, D, _ = make_inputs(1, l, 2, 16, 1, 16)
        x = x.clone().requires_grad_()
        y, state = backend.ssd("auto", x, dt, A, B, C, 64, D=D, quadratic_max_len=qml, **kw)
        return type(y.grad_fn).__name__, state

    assert form(64, 256, return_final_state=False)[0] == "_SSDQuadraticBackward"
    assert form(65, 256, return_final_state=False) == ("_SSDBlockedBackward", None)
    assert form(200, 256, return_final_state=False)[0] == "_SSDBlockedBackward"
    name, state = form(100, 256, return_final_state=True)
    assert name != "_SSDBlockedBackward" and state.shape == (1, 2, 16, 16)
    with backend.quadratic_kernels("torch"):
        assert form(100, 256, return_final_state=False)[0] != "_SSDBlockedBackward"
    monkeypatch.setattr(ssd_blocked_triton, "MAX_LEN", 96)
    assert form(100, 256, return_final_state=False)[0] != "_SSDBlockedBackward"


def test_supports_refuses_long_rows_and_fp64():
    from lightning_mamba.models.kernels import ssd_blocked_triton as k

    if k.triton is None:
        pytest.skip("triton is not installed")
    x, B, dt = torch.zeros(1, k.MAX_LEN, 2, 16), torch.zeros(1, k.MAX_LEN, 1, 16), torch.zeros(1, k.MAX_LEN, 2)
    assert k.supports(x, dt, B, B)
    assert not k.supports(torch.zeros(1, k.MAX_LEN + 1, 2, 16), dt, B, B)
    assert not k.supports(x, dt.double(), B, B) and not k.supports(x.double(), dt, B, B)
    assert not k.supports(torch.zeros(0, k.MAX_LEN, 2, 16), dt[:0], B[:0], B[:0])


@needs_triton
def test_a_model_trains_through_the_blocked_form_as_through_the_torch_backend(monkeypatch):
    """MambaLM.loss with return_state=False on the Triton path, rows of 99 tokens with documents and
    quadratic_max_len 128: the blocked kernels run (with our conv, norms and loss kernels) and give the torch
    backend's loss and gradients in fp32, and the splits copy in only dt's gradient."""
    from lightning_mamba.models.kernels import backend, ssd_blocked_triton

    calls = []
    blocked_fn = ssd_blocked_triton.ssd_blocked
    monkeypatch.setattr(ssd_blocked_triton, "ssd_blocked", lambda *a, **k: calls.append(1) or blocked_fn(*a, **k))
    monkeypatch.setattr(backend, "uses_triton", lambda name, x: name != "torch")  # the Triton path, on any device
    # (dt's softplus is taken in torch for these rows: its gradient is copied in)
    assert_trains_as_the_torch_backend(quadratic_max_len=128, rows=2, length=100, doc_starts={1: 70}, dt_copied=True)
    assert len(calls) == 2  # one per layer


@needs_triton
def test_the_blocked_kernels_launch_settings_take_the_modules_warps(monkeypatch):
    from lightning_mamba.models.kernels import ssd_blocked_triton

    x, _, _, B, C, _, _ = make_inputs(1, 72, 2, 16, 1, 16)
    for warps in (ssd_blocked_triton.NUM_WARPS, 8):
        monkeypatch.setattr(ssd_blocked_triton, "NUM_WARPS", warps)
        assert ssd_blocked_triton._launch_meta(x, B, C)["num_warps"] == warps
