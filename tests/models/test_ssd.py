"""Chunked SSD against the token-by-token recurrence (float64)."""

import pytest
import torch

from lightning_mamba.models.ssd import ssd_chunked, ssd_quadratic, ssd_recurrent


def make_inputs(b=2, l=37, h=4, p=3, g=2, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    x, B, C = r(b, l, h, p), r(b, l, g, n), r(b, l, g, n)
    dt = torch.nn.functional.softplus(r(b, l, h))
    A = -torch.rand(h, generator=gen, dtype=torch.float64) * 2 - 0.1
    return x, dt, A, B, C


@pytest.mark.parametrize("chunk_size", [1, 4, 8, 64])
def test_chunked_equals_recurrence(chunk_size):
    x, dt, A, B, C = make_inputs()
    y_ref, s_ref = ssd_recurrent(x, dt, A, B, C)
    y, s = ssd_chunked(x, dt, A, B, C, chunk_size)
    torch.testing.assert_close(y, y_ref.double(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_ref.double(), rtol=1e-10, atol=1e-10)


def test_initial_state_and_pieces_equal_whole():
    x, dt, A, B, C = make_inputs(l=50)
    y_all, s_all = ssd_chunked(x, dt, A, B, C, 8)
    cut = 23  # not a multiple of the chunk size
    y1, s1 = ssd_chunked(x[:, :cut], dt[:, :cut], A, B[:, :cut], C[:, :cut], 8)
    y2, s2 = ssd_chunked(x[:, cut:], dt[:, cut:], A, B[:, cut:], C[:, cut:], 8, initial_state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_all, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s_all, rtol=1e-10, atol=1e-10)


def test_seq_idx_equals_separate_documents():
    x, dt, A, B, C = make_inputs(b=1, l=40)
    bounds = [0, 5, 6, 21, 40]  # a one-token document too; boundaries inside and across chunks
    seq_idx = torch.zeros(1, 40, dtype=torch.int32)
    for i, (a, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        seq_idx[:, a:e] = i
    init = torch.randn(1, 4, 3, 5, dtype=torch.float64)
    y, s = ssd_chunked(x, dt, A, B, C, 8, initial_state=init, seq_idx=seq_idx)
    y_rec, s_rec = ssd_recurrent(x, dt, A, B, C, initial_state=init, seq_idx=seq_idx)
    torch.testing.assert_close(y, y_rec, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_rec, rtol=1e-10, atol=1e-10)
    for i, (a, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        sl = slice(a, e)
        y_doc, s_doc = ssd_chunked(x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], 8, initial_state=init if i == 0 else None)
        torch.testing.assert_close(y[:, sl], y_doc, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_doc, rtol=1e-10, atol=1e-10)


def test_padding_to_chunk_size_changes_nothing():
    x, dt, A, B, C = make_inputs(l=16)
    y16, s16 = ssd_chunked(x, dt, A, B, C, 16)
    y, s = ssd_chunked(x[:, :13], dt[:, :13], A, B[:, :13], C[:, :13], 16)
    y13, s13 = ssd_chunked(x[:, :13], dt[:, :13], A, B[:, :13], C[:, :13], 13)
    torch.testing.assert_close(y, y13, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s13, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y, y16[:, :13], rtol=1e-10, atol=1e-10)


def test_gradients_match_recurrence():
    x, dt, A, B, C = make_inputs(l=12)
    inputs = [t.clone().requires_grad_() for t in (x, dt, A, B, C)]
    y, s = ssd_chunked(*inputs, 4)
    (y.sum() + s.pow(2).sum()).backward()
    g1 = [t.grad.clone() for t in inputs]
    inputs = [t.clone().detach().requires_grad_() for t in (x, dt, A, B, C)]
    y, s = ssd_recurrent(*inputs)
    (y.sum() + s.pow(2).sum()).backward()
    for a, b in zip(g1, [t.grad for t in inputs]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_segsum_exp_matches_the_stable_form_and_its_autograd():
    from lightning_mamba.models.ssd import _SegsumExp, segsum

    x = -torch.rand(3, 2, 50, dtype=torch.float64) * 3  # log alpha per step, strong decays included
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    out, ref = _SegsumExp.apply(a), segsum(b).exp()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-300)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    assert (a.grad[..., 0] == 0).all()


def test_segsum_exp_in_fp32_over_a_long_chunk():
    from lightning_mamba.models.ssd import _SegsumExp, segsum

    x = -torch.rand(2, 4, 256, dtype=torch.float64) * 1.6  # dt * A up to the official init's 0.1 * 16
    out = _SegsumExp.apply(x.float()).double()
    ref = segsum(x).exp()
    assert torch.isfinite(out).all()
    assert ((out - ref).abs() <= 1e-4 * ref + 1e-30).all()  # |cs| <= 410: exponent rounding ~ 410 * 6e-8


# ---- the attention form (ssd_quadratic): the chunked scan from a zero state, without states ----------------------
def documents(b: int, l: int, bounds: list[int]) -> torch.Tensor:
    """seq_idx (b, l): a new document at every position in ``bounds`` (row r numbered from 3 * r: rows need not
    start at 0)."""
    starts = torch.zeros(l, dtype=torch.int64)
    starts[[i for i in bounds if 0 < i < l]] = 1
    return (torch.cumsum(starts, 0)[None] + 3 * torch.arange(b)[:, None]).to(torch.int32)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("l", [1, 7, 16, 37])
@pytest.mark.parametrize("g", [1, 2])
@pytest.mark.parametrize("with_docs", [False, True])
def test_quadratic_equals_chunked_and_recurrence(dtype, tol, l, g, with_docs):
    x, dt, A, B, C = (t.to(dtype) for t in make_inputs(l=l, g=g))
    seq_idx = documents(2, l, [1, 5, 6, 21]) if with_docs else None  # a one-token document too
    y, s = ssd_quadratic(x, dt, A, B, C, seq_idx=seq_idx)
    y_chunk, s_chunk = ssd_chunked(x, dt, A, B, C, 8, seq_idx=seq_idx)
    y_rec, s_rec = ssd_recurrent(x, dt, A, B, C, seq_idx=seq_idx)
    assert y.dtype == dtype and s.dtype == dtype  # fp32 compute at least, as the chunked scan's
    for got, want in ((y, y_chunk), (s, s_chunk), (y, y_rec), (s, s_rec)):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_quadratic_keeps_a_half_precision_input_in_its_dtype_and_computes_in_fp32():
    x, dt, A, B, C = make_inputs(l=20)
    y, s = ssd_quadratic(x.bfloat16(), dt.float(), A.float(), B.bfloat16(), C.bfloat16())
    y_ref, s_ref = ssd_chunked(x.bfloat16(), dt.float(), A.float(), B.bfloat16(), C.bfloat16(), 8)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-4)


def test_quadratic_without_the_final_state_gives_the_same_output():
    x, dt, A, B, C = make_inputs(l=13)
    seq_idx = documents(2, 13, [4])
    y, s = ssd_quadratic(x, dt, A, B, C, seq_idx=seq_idx, return_final_state=False)
    assert s is None
    torch.testing.assert_close(y, ssd_quadratic(x, dt, A, B, C, seq_idx=seq_idx)[0], rtol=0, atol=0)


@pytest.mark.parametrize("with_docs", [False, True])
def test_quadratic_gradients_match_chunked(with_docs):
    x, dt, A, B, C = make_inputs(l=19, g=2)
    seq_idx = documents(2, 19, [3, 11]) if with_docs else None
    gen = torch.Generator().manual_seed(1)
    wy = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    ws = torch.randn(2, 4, 3, 5, generator=gen, dtype=x.dtype)

    def grads(scan):
        inputs = [t.clone().requires_grad_() for t in (x, dt, A, B, C)]
        y, s = scan(*inputs)
        return torch.autograd.grad((y * wy).sum() + (s * ws).sum(), inputs)

    got = grads(lambda *a: ssd_quadratic(*a, seq_idx=seq_idx))
    want = grads(lambda *a: ssd_chunked(*a, 8, seq_idx=seq_idx))
    for name, a, b in zip(("x", "dt", "A", "B", "C"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_quadratic_under_autocast_feeds_b_and_c_to_the_matmul_without_an_fp32_copy(monkeypatch):
    """Under autocast the matmuls cast B and C to autocast's dtype anyway: the attention form hands them over in
    that dtype (no fp32 copy of a d_state-wide tensor and back), with the same outputs and gradients, bit for bit,
    as when it cast them to fp32 first."""
    import lightning_mamba.models.ssd as ssd

    from ..op_watch import OpWatch, tensors

    x, dt, A, B, C = make_inputs(b=2, l=16, h=4, p=8, g=1, n=24)
    bc_shape = tuple(B.shape)

    def run():
        inputs = [x.bfloat16(), dt.float(), A.float(), B.bfloat16(), C.bfloat16()]
        inputs = [t.clone().requires_grad_() for t in inputs]
        fp32_bc = []  # fp32 copies of a B- or C-shaped tensor

        def see(func, args, out):
            if func.overloadpacket is torch.ops.aten._to_copy:
                fp32_bc.extend(t for t in tensors(out) if t.dtype == torch.float32 and tuple(t.shape) == bc_shape)

        with OpWatch(see), torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = ssd_quadratic(*inputs, return_final_state=False)
        y.float().square().sum().backward()
        return len(fp32_bc), y, [t.grad for t in inputs]

    copies, y, grads = run()
    assert copies == 0
    monkeypatch.setattr(ssd, "_operand_dtype", ssd._compute_dtype)  # the former cast to fp32
    copies_fp32, y_fp32, grads_fp32 = run()
    assert copies_fp32 == 2  # the check itself sees the copies it counts
    torch.testing.assert_close(y, y_fp32, rtol=0, atol=0)
    for name, a, b in zip(("x", "dt", "A", "B", "C"), grads, grads_fp32):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
