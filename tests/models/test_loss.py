"""The chunked linear cross-entropy equals lm_head + F.cross_entropy: loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from lightning_mamba.models.loss import linear_cross_entropy
from lightning_mamba.training.module import MambaLitModule


def loss_and_grads(fn, hidden, weight, labels, upstream=3.0):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    loss = fn(hidden, weight, labels)
    return (loss, *torch.autograd.grad(loss * upstream, [hidden, weight]))


def unfused(hidden, weight, labels):
    logits = hidden @ weight.t()
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, 1), labels.flatten())


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, None])
def test_loss_and_grads_match_the_unfused_loss_in_fp64(chunk_rows):
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 21, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    labels = torch.randint(0, 50, (3, 21))
    labels[0, :5] = -100  # ignored positions
    labels[2, -1] = -100
    ours = loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk_rows), hidden, weight, labels)
    ref = loss_and_grads(unfused, hidden, weight, labels)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bf16_autocast_matches_the_unfused_loss():
    torch.manual_seed(0)
    hidden, weight = torch.randn(4, 33, 32), torch.randn(300, 32) * 0.2
    labels = torch.randint(0, 300, (4, 33))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, 10), hidden, weight, labels)
        ref = loss_and_grads(unfused, hidden, weight, labels)
    assert ours[1].dtype == torch.float32 and ours[2].dtype == torch.float32  # grads in the parameters' dtype
    torch.testing.assert_close(ours[0], ref[0], rtol=2e-3, atol=2e-3)
    for a, b in zip(ours[1:], ref[1:]):
        assert ((a - b).norm() / b.norm()).item() < 2e-2


def test_no_grad_gives_the_loss_and_all_ignored_gives_nan_like_cross_entropy():
    hidden, weight = torch.randn(2, 5, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels, 3), unfused(hidden, weight, labels))
    ignored = torch.full((2, 5), -100)
    assert linear_cross_entropy(hidden, weight, ignored).isnan() and unfused(hidden, weight, ignored).isnan()


def test_training_step_uses_it_with_tied_embeddings_and_matches_the_logits_path():
    torch.manual_seed(0)
    module = MambaLitModule(d_model=32, n_layer=2, d_state=8, headdim=16, vocab_size=64, chunk_size=8,
                            tie_embeddings=True)
    ids = torch.randint(0, 64, (2, 17))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    loss = module.model_step(batch)
    grads = torch.autograd.grad(loss, list(module.parameters()))
    logits, _ = module.model(batch["input_ids"])
    ref = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    ref_grads = torch.autograd.grad(ref, list(module.parameters()))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):  # the tied embedding gets both its uses' gradients
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _added_product(device):
    from lightning_mamba.models import loss

    gen = torch.Generator().manual_seed(0)
    acc = torch.randn(300, 64, generator=gen)
    a, b = (torch.randn(300, 200, generator=gen) * 3).bfloat16(), torch.randn(200, 64, generator=gen).bfloat16()
    exact = acc.double() + a.double() @ b.double()
    acc = acc.to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss._add_product_(acc, a.to(device), b.to(device))
    assert acc.dtype == torch.float32
    return ((acc.cpu().double() - exact).norm() / exact.norm()).item()


def test_the_weight_gradients_sum_takes_half_products_into_fp32():
    """On the CPU the product is rounded to bf16 before the fp32 add (the fallback): within bf16's rounding."""
    assert 1e-4 < _added_product("cpu") < 1e-2


@pytest.mark.gpu
def test_on_cuda_the_weight_gradients_sum_is_one_fp32_gemm():
    """On CUDA the GEMM adds its fp32 accumulators into the fp32 sum (no bf16 rounding of the product), where this
    torch's addmm takes an fp32 out for bf16 inputs; the fallback is the CPU's rounding."""
    from lightning_mamba.models import loss

    err = _added_product("cuda")
    assert loss.FP32_ADDMM is not None
    assert err < (1e-5 if loss.FP32_ADDMM else 1e-2), (loss.FP32_ADDMM, err)
