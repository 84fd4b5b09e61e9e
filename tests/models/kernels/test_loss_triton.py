"""The Triton cross-entropy kernel gives each row's loss and overwrites the logits with the loss's gradient, as
torch computes them; the fused linear cross-entropy built on it equals lm_head + F.cross_entropy.

Runs on CUDA when available, else on CPU through Triton's interpreter when TRITON_INTERPRET=1, else skips.
"""

import pytest
import torch
import torch.nn.functional as F

from lightning_mamba.models.kernels import loss_triton
from lightning_mamba.models.kernels.loss_triton import cross_entropy_rows_
from lightning_mamba.models.loss import linear_cross_entropy

from ..test_loss import loss_and_grads, unfused
from .triton_env import DEVICE, needs_triton


@pytest.fixture
def small_blocks(monkeypatch):
    """A block narrower than the vocabulary, so that rows take several steps of the kernel's loops."""
    monkeypatch.setattr(loss_triton, "BLOCK_V", 64)


def reference(logits, labels):
    """Per-row loss and its gradient by autograd, in fp32 (0 for ignored rows)."""
    x = logits.float().detach().requires_grad_()
    loss = F.cross_entropy(x, labels, reduction="none")
    loss.sum().backward()
    return loss.detach(), x.grad


@needs_triton
@pytest.mark.parametrize("pass1", loss_triton.PASS1_CHOICES)
@pytest.mark.parametrize("vocab", [300, 40], ids=["blocks", "narrower_than_a_block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_loss_and_gradient_in_place(small_blocks, monkeypatch, dtype, vocab, pass1):
    monkeypatch.setattr(loss_triton, "PASS1", pass1)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, vocab, generator=g) * 4).to(DEVICE, dtype)
    logits[3, 17] = 90.0  # a large logit: the running max must keep exp in range
    logits[4, vocab - 1] = 90.0  # ... met late in the row, after the running sums
    labels = torch.randint(0, vocab, (37,), generator=g).to(DEVICE)
    labels[[0, 5, 36]] = -100
    labels[1], labels[2] = 0, vocab - 1  # first and last column
    want_loss, want_grad = reference(logits, labels)
    loss = cross_entropy_rows_(logits, labels, write_grad=True)
    assert loss.dtype == torch.float32 and logits.dtype == dtype
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    assert (loss[[0, 5, 36]] == 0).all() and (logits[[0, 5, 36]] == 0).all()
    tol = 1e-6 if dtype == torch.float32 else 4e-3  # the gradient is written in the logits' dtype
    torch.testing.assert_close(logits.float(), want_grad, rtol=0, atol=tol)


@needs_triton
def test_rows_loss_only_leaves_the_logits_and_reads_strided_rows(small_blocks):
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(9, 250, generator=g).to(DEVICE)
    logits = wide[:, 10:210]  # rows 250 apart, 200 columns
    labels = torch.randint(0, 200, (9,), generator=g).to(DEVICE)
    before = wide.clone()
    loss = cross_entropy_rows_(logits, labels, write_grad=False)
    torch.testing.assert_close(loss, reference(logits, labels)[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(wide, before)
    with pytest.raises(ValueError, match="contiguous rows"):
        cross_entropy_rows_(wide.t(), labels, write_grad=False)


@needs_triton
@pytest.mark.parametrize("chunk_rows", [5, None])
def test_fused_linear_cross_entropy_matches_the_unfused_loss(small_blocks, chunk_rows):
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 21, 16, device=DEVICE), torch.randn(130, 16, device=DEVICE) * 0.5
    labels = torch.randint(0, 130, (3, 21), device=DEVICE)
    labels[0, :5] = -100
    ours = loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_rows, fused=True), hidden, weight, labels)
    ref = loss_and_grads(unfused, hidden, weight, labels)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu  # realistic shapes, mamba_ssm: CUDA only
@needs_triton
def test_fused_loss_at_the_130m_shape_under_bf16_autocast():
    """2 x 2048 tokens, d_model 768, the official padded vocabulary (50280): loss and gradients as the unfused
    bf16 path (lm_head in bf16, cross_entropy on the fp32 upcast)."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 2048, 768, device="cuda")
    weight = torch.randn(50280, 768, device="cuda") * 0.02
    labels = torch.randint(0, 50277, (2, 2048), device="cuda")
    labels[:, :100] = -100
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, fused=True), hidden, weight, labels)
        ref = loss_and_grads(unfused, hidden, weight, labels)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-3, atol=1e-3)
    for a, b in zip(ours[1:], ref[1:]):
        assert ((a - b).norm() / b.norm()).item() < 1e-2


@pytest.mark.gpu  # realistic shapes, mamba_ssm: CUDA only
@needs_triton
def test_the_model_loss_takes_the_kernel_on_the_triton_backend_only(monkeypatch):
    from lightning_mamba.models.config import MambaConfig
    from lightning_mamba.models.kernels.backend import _triton_scan
    from lightning_mamba.models.lm import MambaLM

    if _triton_scan()[0] is None:  # (also installs the placeholder mamba-ssm's import needs)
        pytest.skip(f"mamba_ssm's Triton kernels are unavailable: {_triton_scan()[1]}")
    calls = []
    kernel = loss_triton.cross_entropy_rows_
    monkeypatch.setattr(loss_triton, "cross_entropy_rows_", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    torch.manual_seed(0)
    config = MambaConfig(d_model=64, n_layer=2, vocab_size=256, ssm_cfg={"d_state": 16, "headdim": 16, "chunk_size": 64})
    model = MambaLM(config, backend="triton").cuda()
    ids = torch.randint(0, 256, (2, 129), device="cuda")
    fused = model.loss(ids[:, :-1], ids[:, 1:])[0]
    assert calls
    model.set_backend("torch")
    calls.clear()
    plain = model.loss(ids[:, :-1], ids[:, 1:])[0]
    assert not calls
    torch.testing.assert_close(fused, plain, rtol=2e-3, atol=2e-3)
