"""The mixer's split pieces hand their split a contiguous gradient (what CUDA's cat needs for its vectorized copy)."""

import pytest
import torch

from lightning_mamba.models import mixer as mixer_module
from lightning_mamba.models.mixer import Mamba2, split_last

from ..op_watch import OpWatch


def backward_cats(quadratic_max_len: int, split=None, monkeypatch=None) -> list[list[bool]]:
    if split is not None:
        monkeypatch.setattr(mixer_module, "split_last", split)
    torch.manual_seed(0)
    mixer = Mamba2(d_model=64, d_state=16, headdim=16, chunk_size=8, quadratic_max_len=quadratic_max_len, backend="torch")
    u = torch.randn(3, 8, 64, requires_grad=True)
    out, _ = mixer(u, return_state=False)
    cats = []  # per aten.cat: whether each input is contiguous

    def see(func, args, out):
        if func is torch.ops.aten.cat.default:
            cats.append([t.is_contiguous() for t in args[0]])

    with OpWatch(see):
        out.square().sum().backward()
    return cats


@pytest.mark.parametrize("quadratic_max_len", [0, 64])
def test_split_backward_gets_contiguous_grads(quadratic_max_len, monkeypatch):
    cats = backward_cats(quadratic_max_len)
    assert len(cats) >= 2  # the in_proj split and the x/B/C split
    assert all(all(c) for c in cats), cats
    # the attention form hands back transposed grads: without the contiguous copy some cat input is strided
    if quadratic_max_len:
        plain = backward_cats(quadratic_max_len, lambda t, sizes: torch.split(t, sizes, dim=-1), monkeypatch)
        assert not all(all(c) for c in plain), plain


def test_split_last_is_split_and_keeps_values():
    t = torch.randn(2, 5, 9, requires_grad=True)
    pieces = split_last(t, [2, 3, 4])
    for a, b in zip(pieces, torch.split(t, [2, 3, 4], dim=-1)):
        assert torch.equal(a, b)
    grad = torch.randn(2, 9, 5).transpose(1, 2)  # a strided upstream gradient
    (pieces[0].sum() + (pieces[1] * grad[..., 2:5]).sum() + pieces[2].sum()).backward()
    assert torch.equal(t.grad[..., 2:5], grad[..., 2:5])
    with torch.no_grad():
        assert all(p._base is t for p in split_last(t, [2, 3, 4]))  # no autograd wrapper when no grad
