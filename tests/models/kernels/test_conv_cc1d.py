"""models/kernels/conv_cc1d.py: causal_conv1d's kernels behind our conv's contract, and backend.py's rule for when
they run.

On CPU the library is a torch stand-in written from its documented semantics (tests/cc1d_stand_in.py, which also
asserts the layouts and dtypes its C++ entry points check): the adapter must pass it u's channel-last view, the
state channel-last, seq_idx int32 numbered from 0, and get models/conv.py's results (outputs, new state, gradients,
decode step). The ``gpu`` tests run the real library (skipped where it is not installed): the same comparison in
fp32, and once inside a CUDA graph capture (the training step is captured: training/cuda_graph.py)."""

import sys

import pytest
import torch
import torch.nn.functional as F

from lightning_mamba.models.conv import causal_conv1d, conv_step
from lightning_mamba.models.kernels import backend, conv_cc1d, conv_triton
from tests.cc1d_stand_in import stand_in_library

CASES = ("plain", "seq_idx", "state", "state+seq_idx")
OFFSET = 16  # u's first column in in_proj's output (16-byte aligned in every dtype, as z's width is in the model)


def docs(l, *starts):
    """One seq_idx row of length l whose documents start at ``starts``."""
    row = torch.zeros(l, dtype=torch.int32)
    for s in starts:
        row[s:] += 1
    return row


def make(b=2, l=37, d=48, k=4, device="cpu", dtype=torch.float64, seed=0):
    """The mixer's layout: u = columns OFFSET..OFFSET+d of a (b, l, width) leaf ``wide`` (row stride a multiple of 8,
    not d); weight (d, 1, k) and bias (d,) leaves in fp32 (fp64 for fp64 u); conv_state (b, d, k-1) contiguous; seq_idx
    with a one-token document, a boundary inside the first k-1 steps and, in row 1, ids that start at 3; dy."""
    g = torch.Generator().manual_seed(seed)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    wide = torch.randn(b, l, d + OFFSET + 24, generator=g).to(device, dtype).requires_grad_()
    weight = (0.5 * torch.randn(d, 1, k, generator=g)).to(device, pdtype).requires_grad_()
    bias = torch.randn(d, generator=g).to(device, pdtype).requires_grad_()
    seq_idx = torch.stack([docs(l, 2, 20, 21), docs(l, 30) + 3][:b]).to(device)
    return dict(wide=wide, weight=weight, bias=bias, seq_idx=seq_idx,
                conv_state=torch.randn(b, d, k - 1, generator=g).to(device, dtype),
                dy=torch.randn(b, l, d, generator=g).to(device, dtype), d=d)


def u_of(inp):
    return inp["wide"][:, :, OFFSET:OFFSET + inp["d"]]


def reference(u, weight, bias, conv_state=None, seq_idx=None):
    out, state = causal_conv1d(u, weight, bias, conv_state, seq_idx)
    return F.silu(out), state


def run(fn, inp, case):
    """(out, new state, grad wide, grad weight, grad bias) of fn in one case."""
    state = inp["conv_state"] if case.startswith("state") else None
    seq = inp["seq_idx"] if "seq_idx" in case else None
    out, new_state = fn(u_of(inp), inp["weight"], inp["bias"], state, seq)
    grads = torch.autograd.grad(out, [inp["wide"], inp["weight"], inp["bias"]], inp["dy"])
    return (out, new_state, *grads)


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert a.shape == b.shape
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def assert_matches_reference(fn, inp, case, tol):
    """fn in this case against models/conv.py on the same values in fp64 on CPU."""
    got = run(fn, inp, case)
    assert got[0].dtype == inp["wide"].dtype and got[1].dtype == inp["wide"].dtype
    assert_close_to_reference(got, inp, case, tol)


def assert_close_to_reference(got, inp, case, tol):
    """got = run(...)'s results against models/conv.py's on inp's values in fp64 on CPU."""
    ref_inp = {k: v.detach().double().cpu().requires_grad_(v.requires_grad) if torch.is_tensor(v) and v.is_floating_point()
               else v.cpu() if torch.is_tensor(v) else v for k, v in inp.items()}
    for name, a, e in zip(("out", "new state", "grad u", "grad weight", "grad bias"), got, run(reference, ref_inp, case)):
        assert rel_err(a, e) <= tol, f"{case}: {name} off by {rel_err(a, e):.2e}"


def with_stand_in(lib):
    return lambda *a: conv_cc1d.conv1d_silu(*a, lib=lib)


# ---- the adapter on the stand-in (CPU) ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_adapter_matches_models_conv(case):
    assert_matches_reference(with_stand_in(stand_in_library()), make(), case, 1e-12)


def test_adapter_passes_the_librarys_layout():
    """u's channel-last view with no copy, the state channel-last in u's dtype, seq_idx int32 numbered from 0 per
    row, return_final_states only without seq_idx (the library refuses the pair)."""
    lib = stand_in_library()
    inp = make()
    u = u_of(inp)
    fp32_state = inp["conv_state"].float()  # a state of another dtype is taken in u's
    for case in CASES:
        state = fp32_state if case.startswith("state") else None
        seq = inp["seq_idx"] if "seq_idx" in case else None
        out, new_state = conv_cc1d.conv1d_silu(u, inp["weight"], inp["bias"], state, seq, lib=lib)
        call = lib.calls[-1]
        assert call["x"].data_ptr() == u.data_ptr() and call["x"].stride() == (u.stride(0), 1, u.stride(1))
        assert out.shape == u.shape and out.is_contiguous()  # the library's channel-last out, seen as (b, l, d)
        assert call["return_final_states"] == (case == "state")
        if seq is None:
            assert call["seq_idx"] is None
        else:
            assert call["seq_idx"].dtype == torch.int32 and call["seq_idx"][:, 0].tolist() == [0, 0]
            assert torch.equal(call["seq_idx"][1], inp["seq_idx"][1] - 3)
        if state is None:
            assert call["initial_states"] is None
            # training: the same output and no state built
            out_only, none = conv_cc1d.conv1d_silu(u, inp["weight"], inp["bias"], state, seq, lib=lib,
                                                   return_state=False)
            assert none is None and torch.equal(out_only, out)
        else:
            assert call["initial_states"].dtype == u.dtype and call["initial_states"].stride(1) == 1
        assert new_state.shape == (2, inp["d"], 3) and new_state.dtype == u.dtype


def test_grad_u_is_written_into_the_splits_buffer():
    """u as the mixer has it, a piece of grad_slots.split_last: the library's backward gets u's columns of the
    split's gradient buffer as its dx (channel-last, no copy after), and the gradients are still models/conv.py's."""
    from lightning_mamba.models.kernels.grad_slots import split_last

    lib = stand_in_library()
    for case in CASES:
        inp = make()
        width = inp["wide"].size(-1)

        def through_split(u, *rest):  # u is u_of(inp): take the same columns as a piece of a split instead
            pieces = split_last(inp["wide"], [OFFSET, inp["d"], width - OFFSET - inp["d"]])
            return conv_cc1d.conv1d_silu(pieces[1], *rest, lib=lib)

        before = len(lib.calls)
        got = run(through_split, inp, case)
        assert_close_to_reference(got, inp, case, 1e-12)
        bwd = [c for c in lib.calls[before:] if c["fn"] == "causal_conv1d_bwd_function"]
        if case == "state":  # the library's own Function (it returns the final state) allocates dx itself
            assert not bwd
            continue
        dx = bwd[-1]["dx"]
        assert dx is not None and dx.stride(1) == 1 and dx.stride(2) == width
        assert dx.data_ptr() == got[2].data_ptr() + OFFSET * got[2].element_size()  # grad wide is the buffer


def test_document_ids_need_not_start_at_0():
    """The library zeroes the output at negative ids (its padding): ours has no padding, any ids only compare, so
    the adapter numbers each row's documents from 0."""
    lib = stand_in_library()
    inp = make()
    for shift in (-5, 7):
        inp["seq_idx"] = make()["seq_idx"] + shift
        for case in ("seq_idx", "state+seq_idx"):
            assert_matches_reference(with_stand_in(lib), inp, case, 1e-12)


def test_pieces_with_the_carried_state():
    """The new state (the library's channel-last final state, or carried_inputs) continues the sequence as
    models/conv.py's does, in pieces shorter than k-1 too; without seq_idx the pieces equal the whole."""
    lib = stand_in_library()
    inp = make(l=24)
    u, w, b = u_of(inp).detach(), inp["weight"].detach(), inp["bias"].detach()
    for seq_idx in (None, inp["seq_idx"]):
        outs = {"adapter": [], "reference": []}
        for name, fn in (("adapter", with_stand_in(lib)), ("reference", reference)):
            state = inp["conv_state"]
            for start, stop in ((0, 2), (2, 3), (3, 10), (10, 24)):
                out, state = fn(u[:, start:stop], w, b, state, None if seq_idx is None else seq_idx[:, start:stop])
                outs[name].append(out)
            outs[name] = torch.cat(outs[name], 1), state
        (got, got_state), (want, want_state) = outs["adapter"], outs["reference"]
        assert rel_err(got, want) < 1e-12 and torch.equal(got_state, want_state)
        if seq_idx is None:
            whole, whole_state = reference(u, w, b, inp["conv_state"])
            assert rel_err(got, whole) < 1e-12 and torch.equal(got_state, whole_state)


def test_step_matches_conv_step_and_leaves_the_callers_state():
    lib = stand_in_library()
    inp = make()
    x = inp["wide"].detach()[:, 5, OFFSET:OFFSET + inp["d"]]  # one token's strided slice of in_proj's output
    for state in (inp["conv_state"], inp["conv_state"].float()):  # x's dtype, or fp32 (the library wants x's)
        before = state.clone()
        out, new_state = conv_cc1d.conv1d_silu_step(x, state, inp["weight"], inp["bias"], lib=lib)
        want, want_state = conv_step(x, state, inp["weight"], inp["bias"])
        assert lib.calls[-1]["fn"] == "causal_conv1d_update" and lib.calls[-1]["x"].data_ptr() == x.data_ptr()
        assert rel_err(out, F.silu(want)) < 1e-12 and torch.equal(new_state, want_state)
        assert new_state.dtype == x.dtype and torch.equal(state, before)


def test_load_refuses_an_old_library(monkeypatch):
    """1.6 refuses a carried-in state with seq_idx (and its kernels give that state no document id): not used."""
    conv_cc1d.load.cache_clear()
    try:
        monkeypatch.setitem(sys.modules, "causal_conv1d", stand_in_library(version="1.6.1"))
        assert conv_cc1d.load() == (None, "causal_conv1d 1.6.1 is older than 1.7")
        conv_cc1d.load.cache_clear()
        lib = stand_in_library(version="1.7.0")
        monkeypatch.setitem(sys.modules, "causal_conv1d", lib)
        assert conv_cc1d.load() == (lib, "")
        conv_cc1d.load.cache_clear()
        monkeypatch.setitem(sys.modules, "causal_conv1d", None)  # import fails with ModuleNotFoundError
        assert conv_cc1d.load() == (None, conv_cc1d.NOT_INSTALLED)
    finally:
        conv_cc1d.load.cache_clear()


def test_unsupported_layouts_are_named():
    u = torch.zeros(2, 8, 88)
    w = torch.zeros(48, 1, 4)
    assert conv_cc1d.unsupported(u[:, :, 16:64], w) is None
    assert "multiples of 8" in conv_cc1d.unsupported(u[:, :, 16:60], w[:44])
    assert "multiples of 8" in conv_cc1d.unsupported(torch.zeros(2, 8, 84)[:, :, 16:64], w)
    assert "width" in conv_cc1d.unsupported(u[:, :, 16:64], torch.zeros(48, 1, 5))
    assert "aligned" in conv_cc1d.unsupported(u[:, :, 2:50], w)
    assert "contiguous" in conv_cc1d.unsupported(u[:, :, 16:64].transpose(0, 1).contiguous().transpose(0, 1)
                                                 .transpose(1, 2).contiguous().transpose(1, 2), w)


# ---- backend.py's dispatch rule, on CPU with the Triton path forced -----------------------------------------------
@pytest.fixture
def forced(monkeypatch):
    """backend's Triton path taken on CPU tensors, causal_conv1d 'installed' as the stand-in, our Triton kernel a
    marker: what runs is what the rule picks."""
    lib = stand_in_library()
    monkeypatch.setattr(backend, "uses_triton", lambda name, x: name != "torch")
    monkeypatch.setattr(backend, "_triton_scan", lambda: (object(), ""))
    monkeypatch.setattr(conv_cc1d, "load", lambda: (lib, ""))
    monkeypatch.setattr(conv_cc1d, "available", lambda: True)
    ran = []

    def triton_marker(u, weight, bias, conv_state=None, seq_idx=None, return_state=True):
        ran.append("triton")
        out, state = reference(u, weight, bias, conv_state, seq_idx)
        return out, state if return_state else None

    monkeypatch.setattr(conv_triton, "causal_conv1d_silu", triton_marker)
    return lib, ran


def test_dispatch_rule(forced, monkeypatch):
    lib, ran = forced
    inp = make()
    u, w, b, state = u_of(inp), inp["weight"], inp["bias"], inp["conv_state"]

    def kernel(*args):
        n_lib, n_triton = len(lib.calls), len(ran)
        backend.conv1d_silu(*args)
        return "causal_conv1d" if len(lib.calls) > n_lib else "triton" if len(ran) > n_triton else "torch"

    assert kernel("auto", u, w, b, state, inp["seq_idx"]) == "causal_conv1d"
    assert kernel("triton", u, w, b, None, None) == "causal_conv1d"
    assert kernel("torch", u, w, b, state, None) == "torch"
    assert kernel("auto", u, w, b, state.clone().requires_grad_(), None) == "torch"  # only torch gives it a gradient
    assert kernel("auto", inp["wide"][:, :, 1:49], w, b, state, None) == "triton"  # misaligned: the library refuses
    short = backend.OURS_CONV_MAX_LEN  # rows this short: ours, measured faster
    assert kernel("auto", u[:, :short], w, b, state, None) == "triton"
    assert kernel("auto", u[:, :short + 1], w, b, state, None) == "causal_conv1d"
    monkeypatch.setattr(conv_cc1d, "available", lambda: False)
    assert kernel("auto", u, w, b, state, None) == "triton"


def test_step_dispatch_rule(forced):
    lib, _ = forced
    inp = make()
    x, w, b, state = inp["wide"][:, 0, OFFSET:OFFSET + inp["d"]], inp["weight"], inp["bias"], inp["conv_state"]
    with torch.no_grad():
        out, new_state = backend.conv1d_silu_step("auto", x, state, w, b)
    assert lib.calls[-1]["fn"] == "causal_conv1d_update"
    want, want_state = backend.conv1d_silu_step("torch", x, state, w, b)
    assert rel_err(out, want) < 1e-12 and torch.equal(new_state, want_state)
    n = len(lib.calls)
    backend.conv1d_silu_step("auto", x, state, w, b)  # grad on: the library has no backward, torch runs
    assert len(lib.calls) == n


def test_conv_kernel_name(forced, monkeypatch):
    assert backend.conv_kernel_name() == "causal_conv1d"
    assert backend.conv_kernel_name("torch") == "torch" and backend.conv_kernel_name("auto", "cpu") == "torch"
    monkeypatch.setattr(conv_cc1d, "available", lambda: False)
    assert backend.conv_kernel_name("auto", torch.device("cuda", 0)) == "triton"
    monkeypatch.setattr(backend, "_triton_scan", lambda: (None, "mamba_ssm does not import"))
    assert backend.conv_kernel_name() == "torch"


def test_model_step_through_the_library_equals_torch(monkeypatch):
    """Mamba2.step takes its conv from backend.conv1d_silu_step: with the library's update there (on the stand-in),
    the same logits and states as the torch ops."""
    from tests.tiny import tiny_lm

    model = tiny_lm().double()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))

    def decode():
        state, logits = model.empty_state(2, dtype=torch.float64), []
        with torch.no_grad():
            for t in range(ids.size(1)):
                out, state = model.step(ids[:, t], state)
                logits.append(out)
        return torch.stack(logits, 1), state

    want, want_state = decode()
    lib = stand_in_library()
    monkeypatch.setattr(backend, "conv1d_silu_step", lambda name, x, conv_state, weight, bias:
                        conv_cc1d.conv1d_silu_step(x, conv_state, weight, bias, lib=lib))
    got, state = decode()
    assert sum(c["fn"] == "causal_conv1d_update" for c in lib.calls) == ids.size(1) * len(model.mixers)
    assert rel_err(got, want) < 1e-12
    assert all(torch.equal(a.conv, b.conv) and torch.equal(a.ssm, b.ssm) for a, b in zip(state, want_state))


# ---- the real library (GPU) ---------------------------------------------------------------------------------------
gpu = pytest.mark.gpu
needs_cc1d = pytest.mark.skipif(not conv_cc1d.available(), reason=f"causal_conv1d: {conv_cc1d.load()[1] or 'no CUDA'}")
GPU_SHAPE = dict(b=2, l=300, d=384)  # test_backend.py's mixer (conv_dim 384), l not a multiple of any tile
FP32 = 1e-4  # of max |reference|: fp32 kernels against fp64


@gpu
@needs_cc1d
@pytest.mark.parametrize("case", CASES)
def test_library_matches_models_conv_fp32(case):
    inp = make(**GPU_SHAPE, device="cuda", dtype=torch.float32)
    assert conv_cc1d.unsupported(u_of(inp), inp["weight"]) is None
    assert_matches_reference(conv_cc1d.conv1d_silu, inp, case, FP32)


@gpu
@needs_cc1d
def test_library_pieces_and_step_fp32():
    inp = make(**GPU_SHAPE, device="cuda", dtype=torch.float32)
    u, w, b = u_of(inp).detach(), inp["weight"].detach(), inp["bias"].detach()
    with torch.no_grad():
        whole, whole_state = reference(u.double(), w.double(), b.double(), inp["conv_state"].double())
        state, outs = inp["conv_state"], []
        for start, stop in ((0, 2), (2, 3), (3, 150), (150, 300)):  # pieces shorter than k-1 too
            out, state = conv_cc1d.conv1d_silu(u[:, start:stop], w, b, state)
            outs.append(out)
        assert rel_err(torch.cat(outs, 1), whole) < FP32 and rel_err(state, whole_state) == 0
        x = inp["wide"].detach()[:, 7, OFFSET:OFFSET + inp["d"]]
        before = inp["conv_state"].clone()
        out, new_state = conv_cc1d.conv1d_silu_step(x, inp["conv_state"], w, b)
        want, want_state = conv_step(x.double(), before.double(), w.double(), b.double())
        assert rel_err(out, F.silu(want)) < FP32 and rel_err(new_state, want_state) == 0
        assert torch.equal(inp["conv_state"], before)


@gpu
@needs_cc1d
def test_backend_runs_the_library():
    if backend._triton_scan()[0] is None:
        pytest.skip(f"mamba_ssm unavailable: {backend._triton_scan()[1]}")
    assert backend.conv_kernel_name("auto", "cuda") == "causal_conv1d"
    inp = make(**GPU_SHAPE, device="cuda", dtype=torch.float32)
    args = (u_of(inp), inp["weight"], inp["bias"], inp["conv_state"], inp["seq_idx"])
    ours = backend.conv1d_silu("auto", *args)
    lib = conv_cc1d.conv1d_silu(*args)
    assert torch.equal(ours[0], lib[0]) and torch.equal(ours[1], lib[1])


@gpu
@needs_cc1d
@pytest.mark.parametrize("case", CASES)
def test_library_inside_a_cuda_graph(case):
    """Forward and backward captured once, replayed on new values written into the same tensors: models/conv.py's
    results on those values."""
    inp = make(**GPU_SHAPE, device="cuda", dtype=torch.float32)

    def step():
        return run(conv_cc1d.conv1d_silu, inp, case)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as make_graphed_callables does
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    fresh = make(**GPU_SHAPE, device="cuda", dtype=torch.float32, seed=1)
    with torch.no_grad():
        for name in ("wide", "weight", "bias", "conv_state", "dy"):
            inp[name].copy_(fresh[name])
    graph.replay()
    torch.cuda.synchronize()
    assert_close_to_reference(captured, fresh, case, FP32)
