"""training/grad_norm.py: the total norm and the clip give torch.nn.utils' bits, for one group and for several."""

import pytest
import torch

from lightning_mamba.training.grad_norm import clip_with_norm_, total_norm


def _grads(dtypes):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=g).to(dtype) * 3 for n, dtype in zip((7, 130, 1, 64), dtypes)]


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 4, (torch.float32, torch.bfloat16, torch.float32, torch.float64)])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_same_bits_as_torch(dtypes, max_norm):
    grads = _grads(dtypes)
    want_norm = torch.nn.utils.get_total_norm(grads)
    norm = total_norm(grads)
    assert torch.equal(norm, want_norm)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, want_norm)
    clip_with_norm_(grads, max_norm, norm)
    for p, g in zip(params, grads):
        assert torch.equal(g, p.grad)
    assert (total_norm(grads) <= max_norm * 1.001) or max_norm > float(norm)


def test_empty_and_non_finite():
    assert float(total_norm([])) == 0.0
    clip_with_norm_([], 1.0, torch.tensor(2.0))  # nothing to do
    grads = [torch.tensor([1.0, float("nan")]), torch.ones(3)]
    assert not total_norm(grads).isfinite()
