"""models/kernels/ssd_chunked_mamba.py: mamba_ssm's chunked SSD kernels under our Function equal the torch scan
(values and every gradient, the raw dt with dt_bias, the softplus and dt_limit applied inside the kernels), and
their backward writes the gradients of x, B, C and dt into the splits' buffers (the whole mixer: test_grad_slots.py);
with save_states the backward reuses the forward's states and recomputes none, and agrees with mamba_ssm's own.

Runs on CUDA, or on the CPU under Triton's interpreter where mamba_ssm's kernels can run there (see
triton_env.mamba_kernels: TRITON_INTERPRET=1, numpy < 2.4, mamba-ssm importable); skips elsewhere (CI)."""

import pytest
import torch

from lightning_mamba.models.config import NO_DT_LIMIT
from lightning_mamba.models.kernels import ssd_chunked_mamba
from lightning_mamba.models.kernels.grad_slots import split_last
from lightning_mamba.models.ssd import positive_dt, ssd_chunked

from ...op_watch import copy_destinations
from .test_grad_slots import rel_err
from .triton_env import DEVICE

TOL = 1e-4 if DEVICE == "cpu" else 3e-3  # on CUDA mamba_ssm's fp32 dots take TF32
# The decay's gradients are equal up to rounding: our backward sums their parts in one kernel, in another order than
# mamba_ssm's launchers (ssd_chunked_backward._decay_grad), and on CUDA its kernels add them with atomics
DECAY = ("dt_raw", "A", "dt_bias")


def same(a, b, name) -> bool:
    """Bitwise equal, except the decay's gradients: within 1e-5."""
    if name not in DECAY:
        return a.dtype == b.dtype and torch.equal(a, b)
    return a.dtype == b.dtype and rel_err(a, b) < 1e-5


def scan_inputs(b=2, l=40, h=4, p=8, g=2, n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = dict(
        x=torch.randn(b, l, h, p, generator=gen),
        dt_raw=torch.randn(b, l, h, generator=gen) - 3.0,  # softplus ~0.05, both sides of the clamps below
        A=-torch.rand(h, generator=gen) - 0.5,
        B=torch.randn(b, l, g, n, generator=gen),
        C=torch.randn(b, l, g, n, generator=gen),
        D=torch.randn(h, generator=gen),
        dt_bias=torch.randn(h, generator=gen) * 0.5,
        initial=torch.randn(b, h, p, n, generator=gen),
    )
    return {k: v.to(DEVICE).requires_grad_() for k, v in t.items()}


@pytest.mark.parametrize("save_states", [False, True], ids=["recomputed", "saved_states"])
@pytest.mark.parametrize("dt_limit", [NO_DT_LIMIT, (0.03, 0.08)], ids=["no_limit", "clamped"])
@pytest.mark.parametrize("docs", [False, True], ids=["one_document", "documents"])
def test_raw_dt_in_the_kernels_equals_the_torch_scan(mamba_kernels, dt_limit, docs, save_states):
    """chunk_scan(x, dt_raw, ..., dt_bias, dt_limit) against ssd_chunked(x, positive_dt(dt_raw, dt_bias, dt_limit)) +
    D x in fp32 (chunks of 16 over 40 tokens, a carried state, documents restarting): y, the final state and the
    gradients of all eight inputs, with mamba_ssm's backward and with ours on the forward's states. On CUDA, where
    mamba_ssm's fp32 dots take TF32, each may be as far from the torch scan as twice mamba_ssm's own public scan is
    (dt_bias's gradient, a sum of cancelling terms, went past 3e-3 there with documents)."""
    t = scan_inputs()
    seq_idx = None
    if docs:
        seq_idx = torch.zeros(2, 40, dtype=torch.int32, device=DEVICE)
        seq_idx[:, 13:] = 1
        seq_idx[1, 30:] = 2
    unclamped = positive_dt(t["dt_raw"], t["dt_bias"]).detach()
    clamped = (unclamped < dt_limit[0]) | (unclamped > dt_limit[1])
    if dt_limit != NO_DT_LIMIT:  # the clamp bites on both sides
        assert (unclamped < dt_limit[0]).any() and (unclamped > dt_limit[1]).any()
    outs = {}
    for name in ("kernels", "torch") + (("mamba_ssm",) if DEVICE == "cuda" else ()):
        if name == "kernels":
            y, final = ssd_chunked_mamba.chunk_scan(t["x"], t["dt_raw"], t["A"], t["B"], t["C"], 16, t["D"],
                                                    t["initial"], seq_idx, dt_bias=t["dt_bias"], dt_limit=dt_limit,
                                                    save_states=save_states)
        elif name == "mamba_ssm":  # the library's own scan, the same kernels and dots
            y, final = mamba_kernels.mamba_chunk_scan_combined(
                t["x"], t["dt_raw"], t["A"], t["B"], t["C"], 16, D=t["D"], dt_bias=t["dt_bias"],
                initial_states=t["initial"], seq_idx=seq_idx, dt_softplus=True, dt_limit=dt_limit,
                return_final_states=True)
        else:
            dt = positive_dt(t["dt_raw"], t["dt_bias"], dt_limit)
            y, final = ssd_chunked(t["x"], dt, t["A"], t["B"], t["C"], 16, initial_state=t["initial"],
                                   seq_idx=seq_idx)
            y = y + t["x"] * t["D"][:, None]
        (y.square().sum() + final.square().sum() / 7).backward()
        outs[name] = (y.detach(), final.detach(), {k: v.grad.clone() for k, v in t.items()})
        for v in t.values():
            v.grad = None
    (yk, fk, gk), (yt, ft, gt) = outs["kernels"], outs["torch"]

    def tol(ref, lib):
        return TOL if lib is None else max(TOL, 2 * rel_err(lib, ref))

    yl, fl, gl = outs.get("mamba_ssm", (None, None, dict.fromkeys(gt)))
    assert rel_err(yk, yt) < tol(yt, yl) and rel_err(fk, ft) < tol(ft, fl)
    for k in gt:
        assert rel_err(gk[k], gt[k]) < tol(gt[k], gl[k]), (k, rel_err(gk[k], gt[k]), gl[k] is not None)
    # clamped steps pass no gradient to dt_raw
    assert (gk["dt_raw"][clamped] == 0).all() and (gk["dt_raw"][~clamped] != 0).all()


def test_the_backward_writes_dt_x_b_c_into_the_splits_buffers(mamba_kernels):
    """Pieces of two grad_slots splits (dt's from one beside an unused piece, x, B, C from the other, as in the
    mixer): the backward writes their gradients in place, so neither split copies, and the gradients equal the
    torch scan's."""
    h, p, g, n = 4, 8, 1, 16
    gen = torch.Generator().manual_seed(1)
    first = torch.randn(2, 40, h + 3, generator=gen).to(DEVICE).requires_grad_()  # (other | dt_raw)
    second = torch.randn(2, 40, h * p + 2 * g * n, generator=gen).to(DEVICE).requires_grad_()  # x | B | C
    A, dt_bias = -torch.rand(h, device=DEVICE) - 0.5, torch.zeros(h, device=DEVICE) - 2.0
    grads = {}
    for name in ("kernels", "torch"):
        other, dt_raw = split_last(first, [3, h])
        x, B, C = split_last(second, [(h, p), (g, n), (g, n)])
        if name == "kernels":
            y, _ = ssd_chunked_mamba.chunk_scan(x, dt_raw, A, B, C, 16, dt_bias=dt_bias)
        else:
            y, _ = ssd_chunked(x, positive_dt(dt_raw, dt_bias), A, B, C, 16)
        copies = copy_destinations(y.square().sum().backward)  # (other gets no gradient: zeros)
        if name == "kernels":  # (Triton's interpreter copies each kernel's arguments flat: not the splits)
            assert [c for c in copies if c[:2] == (2, 40)] == [], copies
        grads[name] = (first.grad, second.grad)
        first.grad = second.grad = None
    for a, b in zip(*grads.values()):
        assert rel_err(a, b) < TOL


def _counting(monkeypatch, module, names):
    """Count the calls of module-level functions (the launchers mamba_ssm's forward and backward call by name)."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        def counted(*args, _name=name, _fn=getattr(module, name), **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("keep_cb", [False, True], ids=["scores_remade", "scores_kept"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_saved_states_backward_equals_mamba_ssms_and_recomputes_nothing(mamba_kernels, monkeypatch, dtype, keep_cb):
    """save_states: the backward runs on the forward's states, dt and dA cumsum (no chunk-state, state-passing or
    cumsum forward in it), and on its scores C B^T where they are kept (keeps_cb: a small fraction of the states'
    bytes), and gives mamba_ssm's own backward's gradients: all equal in fp32; in bf16 all but the decay's (dt_raw,
    A, dt_bias), whose state term reads the states in bf16 where mamba_ssm recomputes them in fp32, equal, and those
    close. Documents, a carried state, dt_limit."""
    base = scan_inputs(seed=3)
    seq_idx = torch.zeros(2, 40, dtype=torch.int32, device=DEVICE)
    seq_idx[:, 21:] = 1
    # at this shape the scores weigh more than the states: kept only with the fraction raised
    monkeypatch.setattr(ssd_chunked_mamba, "CB_KEPT_UP_TO", 100.0 if keep_cb else 0.25)
    names = ["_chunk_cumsum_fwd", "_chunk_state_fwd", "_state_passing_fwd", "_bmm_chunk_fwd"]
    calls = _counting(monkeypatch, mamba_kernels, names)
    grads = {}
    for save in (False, True):
        t = {k: (v.detach().to(dtype) if k in ("x", "B", "C") else v.detach()).requires_grad_() for k, v in base.items()}
        y, final = ssd_chunked_mamba.chunk_scan(t["x"], t["dt_raw"], t["A"], t["B"], t["C"], 16, t["D"], t["initial"],
                                                seq_idx, dt_bias=t["dt_bias"], dt_limit=(0.0, 0.1), save_states=save)
        assert calls == dict.fromkeys(calls, 1)  # the forward's
        (y.float().square().sum() + final.square().sum() / 7).backward()
        remade = dict.fromkeys(calls, 1 if save else 2)  # mamba_ssm's backward recomputes all four
        remade["_bmm_chunk_fwd"] = 1 if save and keep_cb else 2
        assert calls == remade, calls
        calls.update(dict.fromkeys(calls, 0))
        grads[save] = {k: v.grad for k, v in t.items()}
    for k in grads[False]:
        if dtype == torch.float32 or k not in DECAY:
            assert same(grads[True][k], grads[False][k], k), k
        else:
            assert rel_err(grads[True][k], grads[False][k]) < 2e-2, k


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
@pytest.mark.parametrize("sm_count", [4, 1000], ids=["one_split", "split_heads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_backward_is_mamba_ssms_value_for_value(mamba_kernels, monkeypatch, dtype, sm_count, deterministic):
    """ssd_chunked_backward.chunk_scan_backward (states recomputed) against mamba_ssm's own
    _mamba_chunk_scan_combined_bwd on the same inputs: every gradient bitwise equal, with one split of a group's
    heads (whose sum the launchers skip) and with several (an SM count that makes the kernels split the heads), in
    mamba_ssm's default mode and its deterministic one (per-tile workspaces for the decay's gradients, as under
    torch.use_deterministic_algorithms); on CUDA the decay's gradients to rounding in the default mode (mamba_ssm
    sums them with atomics there)."""
    from mamba_ssm.utils import determinism

    from lightning_mamba.models.kernels.ssd_chunked_backward import _splits, chunk_scan_backward

    monkeypatch.setattr(determinism, "_deterministic_override", deterministic)
    real = torch.cuda.get_device_properties

    class _Properties:  # the device's, with another SM count (the launchers split a group's heads by it)
        def __init__(self, device):
            self.device = device
            self.multi_processor_count = sm_count

        def __getattr__(self, name):
            return getattr(real(self.device), name)

    monkeypatch.setattr(torch.cuda, "get_device_properties", _Properties)
    # d_state 160: wider than a grad B / C tile (128 under the interpreter), so the deterministic mode's per-tile
    # workspaces hold more than one tile
    t = {k: v.detach() for k, v in scan_inputs(n=160, seed=5).items()}
    x, B, C = (t[k].to(dtype) for k in ("x", "B", "C"))
    assert _splits(2, 3, 4, 2, x.device)[1] == (1 if sm_count == 4 else 2)
    seq_idx = torch.zeros(2, 40, dtype=torch.int32, device=DEVICE)
    seq_idx[:, 17:] = 1
    limit = (0.0, 0.1)
    y, *_ = mamba_kernels._mamba_chunk_scan_combined_fwd(
        x, t["dt_raw"], t["A"], B, C, 16, D=t["D"], dt_bias=t["dt_bias"], initial_states=t["initial"],
        seq_idx=seq_idx, dt_softplus=True, dt_limit=limit)
    gen = torch.Generator().manual_seed(6)
    dy = torch.randn(y.shape, generator=gen).to(DEVICE, dtype)
    dfinal = torch.randn(t["initial"].shape, generator=gen).to(DEVICE)
    theirs = mamba_kernels._mamba_chunk_scan_combined_bwd(
        dy, x, t["dt_raw"], t["A"], B, C, y, 16, D=t["D"], dt_bias=t["dt_bias"], initial_states=t["initial"],
        dfinal_states=dfinal, seq_idx=seq_idx, dt_softplus=True, dt_limit=limit)
    ours = chunk_scan_backward(dy, x, t["dt_raw"], t["A"], B, C, 16, t["D"], t["dt_bias"], t["initial"], dfinal,
                               seq_idx, limit)
    dx, ddt, dA, dB, dC, dD, _dz, ddt_bias, dinitial = theirs
    for name, a, b in zip(("x", "dt_raw", "A", "B", "C", "D", "dt_bias", "initial"), ours,
                          (dx, ddt, dA, dB, dC, dD, ddt_bias, dinitial)):
        assert same(a, b, name), name


def test_another_mamba_ssm_version_is_not_run_through_our_backward(mamba_kernels, monkeypatch):
    """The backward's launchers follow mamba_ssm 2.3.x's kernel arguments: with another version entries() is None
    (backend.ssd then calls the public scan), with a warning that says so."""
    import importlib.metadata

    assert ssd_chunked_mamba.entries() is not None
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.4.0")
    ssd_chunked_mamba.entries.cache_clear()
    try:
        with pytest.warns(UserWarning, match="mamba-ssm 2.4.0: .* 2.3.x; using mamba_ssm's public scan"):
            assert ssd_chunked_mamba.entries() is None
    finally:
        ssd_chunked_mamba.entries.cache_clear()


def test_the_scores_are_kept_at_the_study_cells_and_not_at_130m():
    """keeps_cb: the forward's fp32 scores C B^T (batch x chunks x groups x chunk^2) go to the backward where they
    are at most CB_KEPT_UP_TO of the kept states' bytes (batch x chunks x heads x headdim x d_state, bf16): at the
    study's d_state 512 / LEN 1024 cell (chunk 128: 8.4 MB against 67 MB a layer), not at 130m (d_state 128, chunk
    256: 34 MB against 25 MB a layer, ~0.8 GB over 24 layers)."""
    def kept(batch, seq_len, chunk, nheads, headdim, d_state):
        chunks = seq_len // chunk
        CB = torch.empty(batch, chunks, 1, chunk, chunk, dtype=torch.float32, device="meta")
        states = torch.empty(batch, chunks, nheads, headdim, d_state, dtype=torch.bfloat16, device="meta")
        return ssd_chunked_mamba.keeps_cb(CB, states)

    assert kept(16, 1024, 128, 16, 32, 512)  # the cell
    assert kept(64, 256, 64, 16, 32, 64)  # d_state 64, LEN 256, chunk 64: 1/4
    assert not kept(64, 256, 64, 16, 32, 32)  # d_state 32: 1/2
    assert not kept(16, 2048, 256, 24, 64, 128)  # 130m
