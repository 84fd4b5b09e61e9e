"""Our Triton norms (models/kernels/norm_triton.py) equal models/norm.py's: residual add + RMSNorm and the gated
RMSNorm, values and gradients (h, residual, weight; y, z, weight), in fp32 and bf16.

Runs on CUDA when available, else on CPU through Triton's interpreter when TRITON_INTERPRET=1, else skips."""

import pytest
import torch
from torch.func import functional_call

from lightning_mamba.models.kernels import norm_triton as kernels
from lightning_mamba.models.norm import RMSNorm, RMSNormGated

from .test_conv_triton import assert_rel_close
from .triton_env import DEVICE, needs_triton

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@pytest.fixture(params=[False, True], ids=["loads_in_step", "prefetch"])
def prefetch(request, monkeypatch):
    """Every plan (both norms, the gated one's narrow groups too) with and without the backward's prefetch of its next
    tile."""
    for key in list(kernels.PLANS):
        monkeypatch.setitem(kernels.PLANS, key, kernels.PLANS[key]._replace(prefetch=request.param))
    return request.param


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def reference_add_rmsnorm(h, residual, weight, eps, residual_in_fp32):
    """The model's torch path (kernels/backend.add_rmsnorm without Triton), weight as the norm's parameter."""
    res = h if residual is None else h + residual
    if residual_in_fp32:
        res = res.float()
    norm = RMSNorm(h.shape[-1], eps).to(h.device)
    return functional_call(norm, {"weight": weight}, (res,)).to(h.dtype), res


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["first block", "residual fp32", "residual same dtype"])
@pytest.mark.parametrize("n_rows, width", [(37, 48), (1100, 48), (9, 200)])
def test_add_rmsnorm_matches_the_torch_norm(dtype, case, n_rows, width, prefetch):
    g = torch.Generator().manual_seed(n_rows + width)
    h = torch.randn(n_rows, width, generator=g).to(DEVICE, dtype)
    residual = None if case == "first block" else torch.randn(n_rows, width, generator=g).to(
        DEVICE, torch.float32 if case == "residual fp32" else dtype)
    weight = (1 + 0.3 * torch.randn(width, generator=g)).to(DEVICE)
    residual_in_fp32 = case != "residual same dtype"
    d_out = torch.randn(n_rows, width, generator=g).to(DEVICE, dtype)
    d_res = torch.randn(n_rows, width, generator=g).to(DEVICE)  # the residual stream's gradient from above

    results = []
    for fn in (reference_add_rmsnorm, kernels.add_rmsnorm):
        h_, r_, w_ = leaves(h, residual, weight)
        out, res_out = fn(h_, r_, w_, 1e-5, residual_in_fp32)
        inputs = [t for t in (h_, r_, w_) if t is not None]
        grads = torch.autograd.grad([out, res_out], inputs, [d_out, d_res.to(res_out.dtype)])
        results.append((out, res_out, grads))
    (out_ref, res_ref, grads_ref), (out, res, grads) = results
    assert out.dtype == h.dtype and res.dtype == res_ref.dtype
    tol = TOL[dtype]
    assert_rel_close(res, res_ref, tol, "h + residual")
    assert_rel_close(out, out_ref, tol, "norm")
    names = ["grad h"] + ([] if residual is None else ["grad residual"]) + ["grad weight"]
    for name, a, b in zip(names, grads, grads_ref, strict=True):
        assert a.dtype == b.dtype, name
        assert_rel_close(a, b, tol, name)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_rows, width, group_size", [(37, 48, 48), (1100, 48, 24), (9, 96, 32)])
def test_gated_rmsnorm_matches_the_torch_norm(dtype, n_rows, width, group_size, prefetch):
    g = torch.Generator().manual_seed(n_rows * width + group_size)
    wide = torch.randn(n_rows, 2 * width + 5, generator=g).to(DEVICE, dtype)
    y, z = wide[:, :width], wide[:, width + 5:]  # column slices of one tensor, as the mixer's y and z can be
    weight = (1 + 0.3 * torch.randn(width, generator=g)).to(DEVICE)
    d_out = torch.randn(n_rows, width, generator=g).to(DEVICE, dtype)
    norm = RMSNormGated(width, group_size, 1e-5).to(DEVICE)

    def reference(y, z, weight, eps, group_size):
        return functional_call(norm, {"weight": weight}, (y, z))

    results = []
    for fn in (reference, kernels.gated_rmsnorm):
        y_, z_, w_ = leaves(y, z, weight)
        out = fn(y_, z_, w_, 1e-5, group_size)
        results.append((out, torch.autograd.grad(out, [y_, z_, w_], d_out)))
    (out_ref, grads_ref), (out, grads) = results
    tol = TOL[dtype]
    assert out.dtype == dtype
    assert_rel_close(out, out_ref, tol, "gated norm")
    for name, a, b in zip(["grad y", "grad z", "grad weight"], grads, grads_ref):
        assert a.dtype == b.dtype, name
        assert_rel_close(a, b, tol, name)


def test_the_backward_walks_several_tiles_per_program():  # the plan alone: runs without triton
    block, rows, programs, per_program = kernels.tile_plan(1100, 48, torch.device("cpu"))
    assert (block, rows) == (64, 16) and per_program == 2 and programs * per_program * rows >= 1100
    assert kernels.tile_plan(32768, 768, torch.device("cpu"))[:2] == (1024, 2)  # 2048 elements a tile
    assert kernels.tile_plan(32768, 1536, torch.device("cpu"), "gated")[:2] == (2048, 1)
    # each norm its own plan: the warps follow its elements per thread
    assert kernels._warps(2048, 1, "add") == 4 and kernels._warps(2048, 1, "gated") == 8
    # the gated norm over the study cells' groups of 512 takes the plan timed fastest there: 16 elements per thread
    assert kernels.plan_key("gated", 512) == "gated_narrow" and kernels.plan_key("gated", 1536) == "gated"
    assert kernels.plan_key("add", 256) == kernels.plan_key("add", 768) == "add"
    assert kernels.tile_plan(16384, 512, torch.device("cpu"), "gated")[:2] == (512, 4)
    assert kernels._warps(512, 4, kernels.plan_key("gated", 512)) == 4 and kernels._warps(512, 4, "gated") == 8


def test_a_width_the_groups_do_not_divide_is_refused():  # before any kernel: runs without triton
    x = torch.zeros(2, 10)
    with pytest.raises(ValueError, match="not a multiple of group_size 4"):
        kernels.gated_rmsnorm(x, x, torch.ones(10), 1e-5, 4)


@needs_triton
def test_the_backend_runs_our_norms_by_default(monkeypatch):
    from lightning_mamba.models.kernels import backend

    monkeypatch.setattr(backend, "uses_triton", lambda name, x: name != "torch")  # the Triton path, on any device
    g = torch.Generator().manual_seed(3)
    h, residual = torch.randn(6, 48, generator=g).to(DEVICE), torch.randn(6, 48, generator=g).to(DEVICE)
    y, z = torch.randn(6, 96, generator=g).to(DEVICE), torch.randn(6, 96, generator=g).to(DEVICE)
    norm, gated = RMSNorm(48).to(DEVICE), RMSNormGated(96, 48).to(DEVICE)
    with torch.no_grad():
        norm.weight.mul_(1.5)
        gated.weight.add_(0.25)
    out, res = backend.add_rmsnorm("auto", h, residual, norm, True)
    gated_out = backend.gated_rmsnorm("auto", y, z, gated)
    ref_out, ref_res = backend.add_rmsnorm("torch", h, residual, norm, True)
    assert_rel_close(res, ref_res, 1e-5, "h + residual")
    assert_rel_close(out, ref_out, 1e-4, "norm")
    assert_rel_close(gated_out, backend.gated_rmsnorm("torch", y, z, gated), 1e-4, "gated norm")
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == "AddRMSNormBackward"


def test_norm_kernels_restores_the_default_and_refuses_an_unknown_name():
    from lightning_mamba.models.config import ConfigError
    from lightning_mamba.models.kernels import backend

    default = {"add": "ours", "gated": "ours"}
    assert backend._norm_kernel == default
    with backend.norm_kernels("mamba_ssm"):
        assert backend._norm_kernel == {"add": "mamba_ssm", "gated": "mamba_ssm"}
        with backend.norm_kernels(add="ours"):  # one norm named: the other keeps what it had
            assert backend._norm_kernel == {"add": "ours", "gated": "mamba_ssm"}
    with backend.norm_kernels(gated="mamba_ssm"):
        assert backend._norm_kernel == {"add": "ours", "gated": "mamba_ssm"}
    assert backend._norm_kernel == default
    with pytest.raises(ConfigError, match="use one of mamba_ssm, ours"), backend.norm_kernels("apex"):
        pass
    with pytest.raises(ConfigError, match="unknown norm kernels 'apex'"), backend.norm_kernels(gated="apex"):
        pass
    assert backend._norm_kernel == default


def test_each_norm_runs_the_kernels_chosen_for_it(monkeypatch):
    """Which kernels run, per norm: ours by default; inside norm_kernels(...) mamba_ssm's for the norms named
    (the library and our kernels replaced by markers, so this runs without triton)."""
    from lightning_mamba.models.kernels import backend, norm_triton

    ran = []

    def marker(name):
        return lambda *args, **kwargs: ran.append(name)

    monkeypatch.setattr(backend, "uses_triton", lambda name, x: name != "torch")
    monkeypatch.setattr(backend, "_triton_norms", lambda: (marker("mamba_ssm add"), marker("mamba_ssm gated")))
    monkeypatch.setattr(norm_triton, "add_rmsnorm", marker("ours add"))
    monkeypatch.setattr(norm_triton, "gated_rmsnorm", marker("ours gated"))
    h, norm, gated = torch.randn(2, 8), RMSNorm(8), RMSNormGated(8, 8)

    def both() -> list[str]:
        ran.clear()
        backend.add_rmsnorm("auto", h, None, norm, True)
        backend.gated_rmsnorm("auto", h, h, gated)
        return list(ran)

    assert both() == ["ours add", "ours gated"]
    with backend.norm_kernels("mamba_ssm"):
        assert both() == ["mamba_ssm add", "mamba_ssm gated"]
    with backend.norm_kernels(gated="mamba_ssm"):
        assert both() == ["ours add", "mamba_ssm gated"]
    with backend.norm_kernels(add="mamba_ssm"):
        assert both() == ["mamba_ssm add", "ours gated"]
