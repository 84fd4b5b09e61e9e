"""The fused attention-form SSD equals ssd.ssd_quadratic plus the D skip, values and every gradient, and the backend
runs it exactly where it should (training's short rows on the Triton path).

Runs on CUDA when available, else on CPU through Triton's interpreter when TRITON_INTERPRET=1 (small shapes),
else skips (CI has no triton); the choice tests at the end need no triton."""

import functools

import pytest
import torch
import torch.nn.functional as F

from lightning_mamba.models.ssd import ssd_quadratic

from ...op_watch import copy_destinations
from .test_conv_triton import assert_rel_close as assert_close_to
from .triton_env import DEVICE, needs_triton


def make_inputs(b, l, h, p, g, n, docs=False, dtype=torch.float32, seed=0):
    """x, B, C as column slices of one wider tensor (as the conv's output is split in the model: strided rows),
    dt = softplus(...) fp32, A < 0, D, and seq_idx (documents starting at l // 3 in every row and at 2 in row 0)."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(b, l, h * p + 2 * g * n + 5, generator=gen).to(DEVICE, dtype)
    x = wide[..., 3:3 + h * p].unflatten(-1, (h, p))
    B = wide[..., 3 + h * p:3 + h * p + g * n].unflatten(-1, (g, n))
    C = wide[..., 3 + h * p + g * n:3 + h * p + 2 * g * n].unflatten(-1, (g, n))
    dt = F.softplus(torch.randn(b, l, h, generator=gen) - 1.0)
    A = -(torch.rand(h, generator=gen) * 2 + 0.1)
    D = torch.randn(h, generator=gen)
    seq_idx = None
    if docs:
        seq_idx = torch.zeros(b, l, dtype=torch.long)
        seq_idx[:, l // 3:] += 1
        seq_idx[0, 2:] += 1
        seq_idx = seq_idx.to(DEVICE)
    return x, dt.to(DEVICE), A.to(DEVICE), B, C, D.to(DEVICE), seq_idx


def reference(x, dt, A, B, C, D, seq_idx):
    y, _ = ssd_quadratic(x, dt, A, B, C, seq_idx=seq_idx, return_final_state=False)
    return y if D is None else y + x * D[:, None]


def values_and_grads(fn, tensors, seq_idx, grad_y):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    y = fn(*leaves, seq_idx)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], grad_y)
    return y, grads


def fused(x, dt, A, B, C, D, seq_idx):
    from lightning_mamba.models.kernels.ssd_quadratic_triton import ssd_quadratic_fused

    return ssd_quadratic_fused(x, dt, A, B, C, D=D, seq_idx=seq_idx)


# relative however small the values (the model's gradients of A_log and dt_bias are ~1e-5)
assert_rel_close = functools.partial(assert_close_to, floor=1e-12)


NAMES = ("x", "dt", "A", "B", "C", "D")


@needs_triton
@pytest.mark.parametrize("b, l, h, p, g, n, docs, with_d", [
    (2, 16, 4, 16, 1, 32, False, True),     # one group shared by every head (the study's models)
    (3, 24, 4, 16, 2, 80, True, True),      # two groups, documents, d_state not a multiple of the 64-wide steps
    (2, 5, 2, 16, 1, 16, True, False),      # a row shorter than the 16-wide tile, no D
    (1, 64, 2, 32, 1, 64, True, True),      # the longest row the kernels take
])
def test_fused_attention_form_equals_the_torch_form_in_fp32(b, l, h, p, g, n, docs, with_d):
    assert_equals_the_torch_form(fused, (b, l, h, p, g, n), docs, with_d)


@needs_triton
@pytest.mark.parametrize("keep", [True, False])
def test_the_backward_reads_the_forwards_scores_or_makes_them_again_alike(monkeypatch, keep):
    """From d_state KEEP_SCORES_FROM_N[tile] the forward writes C B^T (one tile per row and group, fp32) and the
    backward reads it; below, the backward makes it again. Either way the torch form's values and gradients (two
    groups, documents, d_state past one column step)."""
    from lightning_mamba.models.kernels import ssd_quadratic_triton

    monkeypatch.setattr(ssd_quadratic_triton, "KEEP_SCORES_FROM_N", {32: 80 if keep else 81})
    b, l, h, p, g, n = 3, 24, 4, 16, 2, 80
    x, dt, A, B, C, D, seq_idx = make_inputs(b, l, h, p, g, n, docs=True)
    y = ssd_quadratic_triton.ssd_quadratic_fused(*(t.requires_grad_() for t in (x, dt, A, B, C, D)), seq_idx=seq_idx)
    kept = y.grad_fn.saved_tensors[-1]
    assert (kept.shape, kept.dtype) == ((b, g, 32, 32), torch.float32) if keep else kept is None
    # nothing kept where no backward will run: the forward kernel told to make C B^T only
    kernel, modes = ssd_quadratic_triton._ssd_attention_fwd_kernel, []

    class Spy:
        def __getitem__(self, grid):
            return lambda *args, **kw: modes.append(kw["CB"]) or kernel[grid](*args, **kw)

    monkeypatch.setattr(ssd_quadratic_triton, "_ssd_attention_fwd_kernel", Spy())
    with torch.no_grad():
        ssd_quadratic_triton.ssd_quadratic_fused(x, dt, A, B, C, D, seq_idx=seq_idx)
    ssd_quadratic_triton.ssd_quadratic_fused(x, dt, A, B, C, D, seq_idx=seq_idx)
    assert modes == [0, 1 if keep else 0]
    monkeypatch.setattr(ssd_quadratic_triton, "_ssd_attention_fwd_kernel", kernel)
    assert_equals_the_torch_form(fused, (b, l, h, p, g, n), docs=True, with_d=True)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_raw_dt_with_dt_bias_equals_the_softplus_taken_first(dtype):
    """dt given raw (a strided piece of a wider tensor, as in_proj's output is split) with dt_bias: the kernels'
    softplus (threshold 20) and its backward give what softplus(dt + dt_bias) taken in torch first gives, values and
    every gradient, dt_bias's included; the raw dt's gradient comes back in its dtype."""
    from lightning_mamba.models.kernels.ssd_quadratic_triton import ssd_quadratic_fused
    from lightning_mamba.models.ssd import positive_dt

    b, l, h = 2, 24, 4
    x, _, A, B, C, D, seq_idx = make_inputs(b, l, h, 16, 1, 32, docs=True)
    gen = torch.Generator().manual_seed(3)
    wide = (torch.randn(b, l, h + 5, generator=gen) - 2.0).to(DEVICE, dtype)
    wide[0, 3, 6] = 23.0  # past the softplus's threshold: dt = the argument itself
    bias = (torch.randn(h, generator=gen) * 0.5).to(DEVICE)
    grad_y = torch.randn(b, l, h, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def run(kernels: bool):
        leaves = [t.detach().clone().requires_grad_() for t in (x, wide, A, B, C, D, bias)]
        x_, wide_, A_, B_, C_, D_, bias_ = leaves
        raw = wide_[..., 5:]  # (b, l, h), rows h + 5 apart
        if kernels:
            y = ssd_quadratic_fused(x_, raw, A_, B_, C_, D=D_, seq_idx=seq_idx, dt_bias=bias_)
        else:
            y = reference(x_, positive_dt(raw, bias_), A_, B_, C_, D_, seq_idx)
        return y, torch.autograd.grad(y, leaves, grad_y)

    (y, grads), (y_ref, grads_ref) = run(True), run(False)
    assert_rel_close(y, y_ref, 1e-5, "y")
    for name, got, want in zip(("x", "raw dt", "A", "B", "C", "D", "dt_bias"), grads, grads_ref):
        assert got.dtype == want.dtype, name
        # (the bf16 raw dt's gradient is rounded to bf16; grad A, a cancelling sum, meets the step of dt 23 here)
        tol = 1e-2 if dtype == torch.bfloat16 and name == "raw dt" else 5e-5 if name == "A" else 2e-5
        assert_rel_close(got, want, tol, f"grad {name}")


def assert_equals_the_torch_form(fn, shape: tuple, docs: bool, with_d: bool, grad_a_tol: float = 2e-5,
                                 scale: float = 1.0) -> None:
    """``fn`` (a kernel's entry point, called as ``reference``) against the torch form in fp32 at ``shape`` (b, l, h,
    p, g, n): y within 1e-5, every gradient within 2e-5 (grad A within ``grad_a_tol``), all times ``scale``, dtypes
    and shapes kept."""
    b, l, h, p, g, n = shape
    x, dt, A, B, C, D, seq_idx = make_inputs(b, l, h, p, g, n, docs)
    D = D if with_d else None
    grad_y = torch.randn(b, l, h, p, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y_ref, g_ref = values_and_grads(reference, (x, dt, A, B, C, D), seq_idx, grad_y)
    y, grads = values_and_grads(fn, (x, dt, A, B, C, D), seq_idx, grad_y)
    assert y.dtype == x.dtype and y.is_contiguous()
    assert_rel_close(y, y_ref, 1e-5 * scale, "y")
    for name, got, want in zip(NAMES, grads, g_ref):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert_rel_close(got, want, (grad_a_tol if name == "A" else 2e-5) * scale, f"grad {name}")


@needs_triton
def test_fused_attention_form_in_bf16_is_as_close_to_fp32_as_the_torch_form():
    """Under bf16 inputs both forms round; the fused one (fp32 products) may be no further from the fp32 result
    than the torch form (bf16 matmul operands) is, within a factor."""
    x, dt, A, B, C, D, seq_idx = make_inputs(2, 32, 4, 16, 1, 64, docs=True)
    grad_y = torch.randn(2, 32, 4, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    exact, g_exact = values_and_grads(reference, (x, dt, A, B, C, D), seq_idx, grad_y)
    half = [t.to(torch.bfloat16) if t is not None and t.dim() == 4 else t for t in (x, dt, A, B, C, D)]
    y, grads = values_and_grads(fused, half, seq_idx, grad_y.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and grads[3].dtype == torch.bfloat16
    assert_rel_close(y, exact, 2e-2, "y (bf16)")
    for name, got, want in zip(NAMES, grads, g_exact):
        assert_rel_close(got, want, 3e-2, f"grad {name} (bf16)")


@needs_triton
def test_the_backend_takes_the_fused_form_only_for_training_rows(monkeypatch):
    """backend.ssd on the Triton path: rows <= quadratic_max_len without a final state asked -> the fused kernels
    (rows longer than they take, or quadratic_kernels("blocked"): the blocked kernels); a final state asked, or
    quadratic_kernels("torch") -> the torch form."""
    from lightning_mamba.models.kernels import backend, ssd_quadratic_triton

    monkeypatch.setattr(backend, "uses_triton", lambda name, x: name != "torch")  # the Triton path, on any device
    x, dt, A, B, C, D, _ = make_inputs(2, 16, 2, 16, 1, 16)
    x, dt, A, B, C, D = (t.requires_grad_() for t in (x.clone(), dt, A, B.clone(), C.clone(), D))

    def form(**kw):
        y, state = backend.ssd("auto", x, dt, A, B, C, 64, D=D, quadratic_max_len=16, **kw)
        return type(y.grad_fn).__name__, state

    name, state = form(return_final_state=False)
    assert name == "_SSDQuadraticBackward" and state is None
    name, state = form(return_final_state=True)
    assert name != "_SSDQuadraticBackward" and state is not None and state.shape == (2, 2, 16, 16)
    with backend.quadratic_kernels("torch"):
        assert form(return_final_state=False)[0] not in ("_SSDQuadraticBackward", "_SSDBlockedBackward")
    with backend.quadratic_kernels("blocked"):  # the 64-token-block kernels, on rows of one tile too
        assert form(return_final_state=False)[0] == "_SSDBlockedBackward"
        assert form(return_final_state=True)[0] not in ("_SSDQuadraticBackward", "_SSDBlockedBackward")
    monkeypatch.setattr(ssd_quadratic_triton, "MAX_LEN", 8)
    assert form(return_final_state=False)[0] == "_SSDBlockedBackward"  # (the blocked kernels take longer rows)


def test_supports_refuses_long_rows_and_fp64():
    from lightning_mamba.models.kernels import ssd_quadratic_triton as q

    if q.triton is None:
        pytest.skip("triton is not installed")
    x, B = torch.zeros(1, q.MAX_LEN, 2, 16), torch.zeros(1, q.MAX_LEN, 1, 16)
    dt = torch.zeros(1, q.MAX_LEN, 2)
    assert q.supports(x, dt, B, B)
    assert not q.supports(torch.zeros(1, q.MAX_LEN + 1, 2, 16), dt, B, B)
    assert not q.supports(x, dt.double(), B, B) and not q.supports(x.double(), dt, B, B)
    assert not q.supports(torch.zeros(0, q.MAX_LEN, 2, 16), dt[:0], B[:0], B[:0])  # nothing to launch


def test_quadratic_kernels_restores_the_default_and_refuses_an_unknown_name():
    from lightning_mamba.models.config import ConfigError
    from lightning_mamba.models.kernels import backend

    assert backend._kernel_choice["attention-form"] == "ours"
    with backend.quadratic_kernels("torch"):
        assert backend._kernel_choice["attention-form"] == "torch"
    assert backend._kernel_choice["attention-form"] == "ours"
    with pytest.raises(ConfigError, match="use one of ours, torch, blocked"), backend.quadratic_kernels("cuda"):
        pass
    assert backend._kernel_choice["attention-form"] == "ours"


@needs_triton
def test_a_model_trains_through_the_fused_form_as_through_the_torch_backend(monkeypatch):
    """MambaLM.loss with return_state=False (training) on the Triton path, short rows, documents: the fused attention
    form (with our conv, norms and loss kernels) gives the torch backend's loss and gradients, in fp32."""
    from lightning_mamba.models.kernels import backend, ssd_quadratic_triton

    calls = []
    fused_fn = ssd_quadratic_triton.ssd_quadratic_fused
    monkeypatch.setattr(ssd_quadratic_triton, "ssd_quadratic_fused",
                        lambda *a, **k: calls.append(1) or fused_fn(*a, **k))
    monkeypatch.setattr(backend, "uses_triton", lambda name, x: name != "torch")  # the Triton path, on any device
    assert_trains_as_the_torch_backend(quadratic_max_len=16, rows=3, length=13, doc_starts={1: 6}, dt_copied=False)
    assert len(calls) == 2  # one per layer: the fused form ran (on the raw dt: no softplus in torch, no copy)


def assert_trains_as_the_torch_backend(quadratic_max_len: int, rows: int, length: int, doc_starts: dict,
                                       dt_copied: bool) -> None:
    """A 2-layer MambaLM's training loss (return_state=False, documents from ``doc_starts``: row -> position) and
    gradients on the Triton path ("auto", with uses_triton patched by the caller) equal the torch backend's in fp32,
    and the backwards wrote their gradients into the splits' buffers (grad_slots.py): per layer the splits copied in
    no z, xBC, x, B or C, and dt's (from torch's softplus) only if ``dt_copied``."""
    from lightning_mamba.models import MambaConfig, MambaLM

    torch.manual_seed(0)
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=64, ssm_cfg={
        "layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 16, "quadratic_max_len": quadratic_max_len})
    models = {name: MambaLM(cfg, backend=name).to(DEVICE) for name in ("auto", "torch")}
    models["torch"].load_state_dict(models["auto"].state_dict())
    ids = torch.randint(0, 64, (rows, length), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    seq_idx = torch.zeros(rows, length, dtype=torch.long)
    for row, start in doc_starts.items():
        seq_idx[row, start:] = 1
    losses, grads, copied = {}, {}, {}
    for name, model in models.items():
        loss, state = model.loss(ids[:, :-1], ids[:, 1:], seq_idx=seq_idx[:, :-1].to(DEVICE), return_state=False)
        assert state is None
        copied[name] = copy_destinations(loss.backward)
        losses[name] = loss.detach()
        grads[name] = {k: p.grad for k, p in model.named_parameters()}
    dt_shape = (rows, length - 1, models["auto"].mixers[0].nheads)
    assert [c for c in copied["auto"] if c[:2] == dt_shape[:2]] == [dt_shape] * 2 * dt_copied, copied
    assert_rel_close(losses["auto"], losses["torch"], 1e-5, "loss")
    for k, g in grads["torch"].items():
        assert_rel_close(grads["auto"][k], g, 1e-4, f"grad {k}")


@needs_triton
def test_launches_take_the_warps_of_their_tile_and_masks_only_where_rows_do_not_fill_it(monkeypatch):
    """Warps per program by tile length (WARPS_BY_TILE, NUM_WARPS over every tile when set), a register cap only when
    MAXNREG is set, and the unmasked tiles (EVEN) only when the rows and headdim fill the tile."""
    from lightning_mamba.models.kernels import ssd_quadratic_triton

    def meta(l, p=32):
        x, dt, _, B, C, _, _ = make_inputs(1, l, 2, p, 1, 16)
        return ssd_quadratic_triton._launch_args(x, dt, B, C, None)[1]

    for l, tile in ((5, 16), (16, 16), (24, 32), (32, 32), (64, 64)):
        assert meta(l)["num_warps"] == ssd_quadratic_triton.WARPS_BY_TILE[tile]
    assert [meta(l)["EVEN"] for l in (16, 32, 64, 24, 5)] == [True, True, True, False, False]
    assert not meta(32, p=24)["EVEN"] and "maxnreg" not in meta(32)
    monkeypatch.setattr(ssd_quadratic_triton, "NUM_WARPS", 8)
    monkeypatch.setattr(ssd_quadratic_triton, "MAXNREG", 128)
    assert meta(16)["num_warps"] == meta(64)["num_warps"] == 8 and meta(32)["maxnreg"] == 128


def test_the_scores_are_kept_from_their_tiles_d_state_on(monkeypatch):
    """keep_scores: from KEEP_SCORES_FROM_N's d_state for the tile on, never where it says None; every tile the
    kernels launch has an entry."""
    from lightning_mamba.models.kernels import ssd_quadratic_triton as q

    assert set(q.KEEP_SCORES_FROM_N) == set(q.WARPS_BY_TILE)
    monkeypatch.setattr(q, "KEEP_SCORES_FROM_N", {16: 512, 32: 1024, 64: None})
    assert [q.keep_scores(16, n) for n in (256, 511, 512, 2048)] == [False, False, True, True]
    assert [q.keep_scores(32, n) for n in (512, 1024)] == [False, True]
    assert not q.keep_scores(64, 4096)
