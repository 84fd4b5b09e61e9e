"""models/kernels/grad_slots.py: a split whose pieces' gradients land in one buffer.

On CPU with a small producer written here the way the kernels' backwards use it (claim the slot, write into it):
values and gradients are torch.split's in every case (pieces used once, twice, not at all, strided upstream
gradients, a second backward), a claimed slot is written in place with no copy in the split's backward, a slot is
handed out once and only in its dtype, and the mixer's gradients are those of plain splits. The kernels' own claims
are tested beside them (test_conv_cc1d.py on the library's stand-in; the Triton files under the interpreter/CUDA),
and the whole mixer on the Triton path copies no split gradient (on CUDA, or under the interpreter where mamba_ssm's
kernels run there: triton_env.mamba_kernels)."""

import pytest
import torch

from lightning_mamba.models import mixer as mixer_module
from lightning_mamba.models.config import NO_DT_LIMIT
from lightning_mamba.models.kernels.grad_slots import claim, slot_of, split_last
from lightning_mamba.models.mixer import Mamba2

from ...op_watch import copy_destinations
from .triton_env import DEVICE

SIZES = [2, (3, 2), 4]  # widths 2, 6, 4: the middle piece seen as (..., 3, 2)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def plain_split(t, sizes):
    shapes = [tuple(s) if isinstance(s, tuple) else (s,) for s in sizes]
    pieces = torch.split(t, [int(torch.Size(s).numel()) for s in shapes], dim=-1)
    return tuple(p.unflatten(-1, s) if len(s) > 1 else p for p, s in zip(pieces, shapes))


class Doubling(torch.autograd.Function):
    """y = 2 x, whose backward writes grad x into x's slot when it has one (as the kernels' backwards do)."""

    @staticmethod
    def forward(ctx, x, slot):
        ctx.slot = slot
        return 2 * x

    @staticmethod
    def backward(ctx, dy):
        dx = claim(ctx.slot, dy.dtype)
        if dx is None:
            return 2 * dy, None
        torch.mul(dy, 2, out=dx)
        return dx, None


def double(x):
    return Doubling.apply(x, slot_of(x))


def test_split_last_is_torch_split_with_the_pieces_shapes():
    t = torch.randn(2, 5, 12, requires_grad=True)
    for grad_on in (True, False):
        with torch.set_grad_enabled(grad_on):
            for a, b in zip(split_last(t, SIZES), plain_split(t, SIZES)):
                assert a.shape == b.shape and torch.equal(a, b) and a.data_ptr() == b.data_ptr()
    with torch.no_grad():
        assert all(slot_of(p) is None for p in split_last(t, SIZES))  # no autograd node, no slots


def grads_of(split, use):
    torch.manual_seed(0)
    t = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    use(split(t, SIZES)).backward()
    return t.grad


USES = {
    "each once": lambda p: (p[0] * 3).sum() + p[1].sin().sum() + p[2].square().sum(),
    "one twice": lambda p: (p[0] * p[0].exp()).sum() + p[1].sum(),
    "one unused": lambda p: p[0].sum() + p[1].cos().sum(),
    "strided upstream": lambda p: (p[1] * torch.arange(60.0, dtype=torch.float64).view(2, 3, 5, 2).transpose(1, 2)).sum(),
    "claimed": lambda p: double(p[0]).sum() + double(p[1]).square().sum() + double(p[2]).sin().sum(),
    "claimed and used again": lambda p: double(p[1]).sum() + (p[1] ** 3).sum() + double(p[2]).sum(),
}


@pytest.mark.parametrize("use", USES)
def test_gradients_are_torch_splits(use):
    assert torch.equal(grads_of(split_last, USES[use]), grads_of(plain_split, USES[use]))


def test_a_claimed_slot_is_written_in_place_and_not_copied():
    leaf = torch.randn(2, 5, 12, requires_grad=True)
    t = leaf * 1  # not a leaf, as in_proj's output: its gradient goes on as the split hands it over
    pieces = split_last(t, SIZES)
    arrived, handed_on = [], []
    pieces[1].register_hook(arrived.append)
    t.register_hook(handed_on.append)
    loss = double(pieces[0]).sum() + double(pieces[1]).square().sum() + pieces[2].sum()
    # destinations narrower than t: copies into the split's buffer
    copies = [c for c in copy_destinations(loss.backward) if c != tuple(t.shape)]
    assert copies == [tuple(pieces[2].shape)]  # the unclaimed piece is copied in; the claimed ones are not
    # what reached piece 1 lives in the buffer the split handed on (its columns 2..8)
    buffer = handed_on[0]
    assert arrived[0].data_ptr() == buffer.data_ptr() + 2 * buffer.element_size()
    assert torch.equal(buffer[..., 2:8], 8 * pieces[1].detach().flatten(-2))
    assert torch.equal(leaf.grad, buffer)


def test_a_slot_is_handed_out_once_and_in_its_dtype():
    t = torch.randn(2, 5, 12, requires_grad=True)
    pieces = split_last(t, SIZES)
    slot = slot_of(pieces[1])
    assert claim(slot, torch.float64) is None  # another dtype: the caller allocates
    first = claim(slot, torch.float32)
    assert first.shape == pieces[1].shape and first.stride() == pieces[1].stride()
    assert claim(slot, torch.float32) is None
    assert claim(None, torch.float32) is None


class ReshapedDoubling(Doubling):
    """As Doubling, but its backward writes through a (rows, width) view of the slot and returns that view reshaped
    back, as the gated norm's backward does: where a dimension has size 1 the returned tensor's stride there may
    differ from the slot's, though it is the slot."""

    @staticmethod
    def backward(ctx, dy):
        dx = claim(ctx.slot, dy.dtype)
        rows = dy.reshape(-1, dy.size(-1))
        dx = torch.empty_like(rows) if dx is None else dx.view(rows.shape)
        torch.mul(rows, 2, out=dx)
        return dx.view(dy.shape), None


@pytest.mark.parametrize("shape", [(1, 1), (2, 1), (1, 3)], ids=["one_row_one_token", "one_token", "one_row"])
def test_a_slot_returned_with_other_strides_on_size_one_dimensions_is_not_copied(shape):
    """A backward that returns its slot viewed as (rows, width) and back (strides of its size-1 dimensions changed)
    wrote the slot itself: no copy, and no error (b = l = 1 made the split's copy_ of the slot onto itself raise
    "some elements of the input tensor and the written-to tensor refer to a single memory location")."""
    t = torch.randn(*shape, 12, requires_grad=True)
    pieces = split_last(t, SIZES)
    loss = ReshapedDoubling.apply(pieces[0], slot_of(pieces[0])).square().sum() + pieces[2].sum()
    copies = [c for c in copy_destinations(loss.backward) if c != tuple(t.shape)]
    assert copies == [tuple(pieces[2].shape)]  # only the piece its backward did not write
    expected = torch.zeros_like(t)
    expected[..., :2] = 8 * t.detach()[..., :2]
    expected[..., 8:] = 1
    assert torch.equal(t.grad, expected)


def test_a_second_backward_through_the_same_graph():
    t = torch.randn(2, 5, 12, requires_grad=True)
    pieces = split_last(t, SIZES)
    loss = double(pieces[0]).sum() + double(pieces[1]).square().sum() + pieces[2].sum()
    first = torch.autograd.grad(loss, t, retain_graph=True)[0].clone()
    second = torch.autograd.grad(loss, t)[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("quadratic_max_len", [0, 64])
def test_the_mixers_gradients_are_those_of_plain_splits(quadratic_max_len, monkeypatch):
    def grads(split=None):
        if split is not None:
            monkeypatch.setattr(mixer_module, "split_last", split)
        torch.manual_seed(0)
        mixer = Mamba2(d_model=64, d_state=16, headdim=16, chunk_size=8, quadratic_max_len=quadratic_max_len,
                       backend="torch").double()
        u = torch.randn(3, 8, 64, dtype=torch.float64, requires_grad=True)
        mixer(u, return_state=False)[0].square().sum().backward()
        return [u.grad] + [p.grad for p in mixer.parameters()]

    for a, b in zip(grads(), grads(plain_split)):
        assert torch.equal(a, b)


def test_in_place_false_is_torch_split_and_restores():
    from lightning_mamba.models.kernels import grad_slots

    t = torch.randn(2, 5, 12, requires_grad=True)
    with grad_slots.in_place(False):
        pieces = split_last(t, SIZES)
        assert all(slot_of(p) is None for p in pieces)
        assert pieces[0].grad_fn.name().startswith("SplitWithSizes")  # torch.split's node: its backward concatenates
    assert grad_slots._in_place and slot_of(split_last(t, SIZES)[0]) is not None


def on_both_paths(monkeypatch, b: int, l: int, **settings) -> tuple[dict, dict, list]:
    """A mixer (``settings``) on the Triton path ('auto', on the CPU through the interpreter) and on the torch
    backend with the same weights, run on one (b, l) input: their outputs, their gradients (input and parameters),
    and the (b, l, ...) copies the Triton path's backward made (a split gradient copied in; Triton's interpreter
    also copies each kernel's arguments, flat: not these)."""
    from lightning_mamba.models.kernels import backend

    if DEVICE == "cpu":
        monkeypatch.setattr(backend, "uses_triton", lambda name, x: name != "torch")  # the Triton path on the CPU
    torch.manual_seed(0)
    mixers = {name: Mamba2(d_model=32, d_state=16, headdim=16, chunk_size=16, backend=name, **settings).to(DEVICE)
              for name in ("auto", "torch")}
    mixers["torch"].load_state_dict(mixers["auto"].state_dict())
    u = torch.randn(b, l, 32, device=DEVICE)
    outs, grads, copies = {}, {}, []
    for name, mixer in mixers.items():
        x = u.clone().requires_grad_()
        out, _ = mixer(x, return_state=False)
        shapes = copy_destinations(out.square().sum().backward)
        copies += shapes if name == "auto" else []
        outs[name] = out.detach()
        grads[name] = {"u": x.grad, **{k: p.grad for k, p in mixer.named_parameters()}}
    return outs, grads, [c for c in copies if c[:2] == (b, l)]


def assert_paths_agree(outs: dict, grads: dict) -> None:
    # On CUDA mamba_ssm's fp32 dots take TF32 (10-bit mantissa): on 3 tokens A_log's gradient, a sum of a few
    # terms ~1e-5 that partly cancel, came out 2.4e-3 apart on an H100. A wrong kernel is off by O(1).
    tol = 1e-4 if DEVICE == "cpu" else 5e-3
    assert rel_err(outs["auto"], outs["torch"]) < tol
    for k, g in grads["torch"].items():
        assert rel_err(grads["auto"][k], g) < tol, k


@pytest.mark.parametrize("quadratic_max_len, dt_limit, save_chunk_states",
                         [(0, NO_DT_LIMIT, False), (0, (0.004, 0.03), False), (0, NO_DT_LIMIT, True),
                          (64, NO_DT_LIMIT, False)],
                         ids=["chunked", "chunked_dt_limit", "chunked_saved_states", "attention_form"])
def test_on_the_triton_path_every_backward_writes_in_place(mamba_kernels, monkeypatch, quadratic_max_len, dt_limit,
                                                           save_chunk_states):
    """The mixer on the Triton path (mamba_ssm's chunked scan under ssd_chunked_mamba with the raw dt, its backward
    mamba_ssm's or ours on the forward's states, or the fused attention form; the conv by causal_conv1d when
    installed, else ours; our gated norm) against the torch backend in fp32: the same output and gradients
    (dt_bias's, A_log's too), and the splits copy in no gradient (both forms take the raw dt). On CUDA, or on the
    CPU under Triton's interpreter (triton_env.mamba_kernels)."""
    state_passes = []  # mamba_ssm's state-passing forwards: the forward's, and its backward's recomputation
    monkeypatch.setattr(mamba_kernels, "_state_passing_fwd",
                        lambda *a, _fn=mamba_kernels._state_passing_fwd, **k: state_passes.append(1) or _fn(*a, **k))
    outs, grads, copies = on_both_paths(monkeypatch, 2, 40, quadratic_max_len=quadratic_max_len, dt_limit=dt_limit,
                                        save_chunk_states=save_chunk_states)
    assert copies == [], copies
    assert len(state_passes) == (0 if quadratic_max_len else 1 if save_chunk_states else 2)
    assert_paths_agree(outs, grads)


@pytest.mark.parametrize("quadratic_max_len", [0, 64], ids=["chunked", "attention_form"])
@pytest.mark.parametrize("b, l", [(1, 1), (2, 1), (1, 3)], ids=["one_row_one_token", "one_token", "one_row"])
def test_on_the_triton_path_rows_of_one_token(mamba_kernels, monkeypatch, quadratic_max_len, b, l):
    """The mixer on the Triton path on the shortest inputs (one token; batch 1): the same output and gradients as
    the torch backend, and no split gradient copied in (the gated norm's backward hands its slot back viewed
    through (rows, width), which with b x l = 1 changed its size-1 strides: the split copied the slot onto itself,
    and with b = l = 1 that copy_ raised)."""
    outs, grads, copies = on_both_paths(monkeypatch, b, l, quadratic_max_len=quadratic_max_len)
    assert copies == [], copies
    assert_paths_agree(outs, grads)
