"""The fused Triton conv1d + SiLU equals silu(conv.causal_conv1d) and its new state, values and gradients.

Runs on CUDA when available, else on CPU through Triton's interpreter when TRITON_INTERPRET=1 (small shapes),
else skips.
"""

import pytest
import torch
import torch.nn.functional as F

from lightning_mamba.models.conv import causal_conv1d
from lightning_mamba.models.kernels import conv_triton
from lightning_mamba.models.kernels.conv_triton import causal_conv1d_silu

from .triton_env import DEVICE, needs_triton


def make_inputs(b, l, d, k, dtype, bias=True, state=False, seq=None, strided=False, width=None, seed=0):
    """u (b, l, d) (if `strided`, columns 7.. of a (b, l, width) tensor: odd row stride and offset by default),
    weight, bias, conv_state, seq_idx on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(b, l, width or d + 23, generator=g).to(DEVICE, dtype)
    u = wide[:, :, 7:7 + d] if strided else wide[:, :, :d].contiguous()
    weight = (0.5 * torch.randn(d, 1, k, generator=g)).to(DEVICE)
    b_ = torch.randn(d, generator=g).to(DEVICE) if bias else None
    conv_state = torch.randn(b, d, k - 1, generator=g).to(DEVICE, dtype) if state else None
    seq_idx = None if seq is None else seq.to(DEVICE)
    return u, weight, b_, conv_state, seq_idx


def docs(l, *starts, dtype=torch.int64):
    """One seq_idx row of length l whose documents start at `starts`."""
    row = torch.zeros(l, dtype=dtype)
    for s in starts:
        row[s:] += 1
    return row


def run(fn, u, weight, bias, conv_state, seq_idx, grad_out):
    """(out, new_state, grad u, grad weight, grad bias) of fn with leaf copies of u, weight, bias."""
    u = u.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    bias = None if bias is None else bias.detach().requires_grad_()
    out, state = fn(u, weight, bias, conv_state, seq_idx)
    grads = torch.autograd.grad(out, [u, weight] + ([] if bias is None else [bias]), grad_out.to(out.dtype))
    return out, state, *grads


def reference(u, weight, bias, conv_state, seq_idx):
    out, state = causal_conv1d(u, weight, bias, conv_state, seq_idx)
    return F.silu(out), state


def assert_rel_close(actual, expected, tol, what, floor=1.0):
    """max |actual - expected| <= tol * max(max |expected|, floor) (a floor of 1 reads small tensors absolutely;
    a tiny floor makes it relative however small the values, as gradients of decay parameters are)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, what
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    scale = max(expected.abs().max().item(), floor) if expected.numel() else 1.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}"


def check(inputs, tol, grad_out=None):
    """Ours on `inputs` against the torch reference on the same values in fp64 (fp32 for fp16/bf16 inputs)."""
    u, weight, bias, conv_state, seq_idx = inputs
    if grad_out is None:
        grad_out = torch.randn(u.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ref_dtype = torch.float64 if u.dtype == torch.float32 else torch.float32
    to_ref = lambda t: None if t is None else t.to(ref_dtype)  # noqa: E731
    ours = run(causal_conv1d_silu, u, weight, bias, conv_state, seq_idx, grad_out)
    ref = run(reference, to_ref(u), to_ref(weight), to_ref(bias), to_ref(conv_state), seq_idx, grad_out.to(ref_dtype))
    assert ours[0].dtype == u.dtype and ours[0].is_contiguous() and ours[1].dtype == u.dtype
    assert ours[2].dtype == u.dtype and ours[3].dtype == weight.dtype
    names = ["out", "new_state", "grad u", "grad weight", "grad bias"]
    for name, a, e in zip(names, ours, ref):
        assert_rel_close(a, e, 0.0 if name == "new_state" else tol, name)


FP32 = 1e-5
SMALL_CASES = {  # name: (b, l, d, k, bias, state, seq_idx rows or None, strided)
    "plain": (2, 130, 40, 4, True, False, None, False),
    "no_bias_state_d200": (1, 5, 200, 4, False, True, None, True),
    "l1_state_seq": (2, 1, 40, 4, True, True, [docs(1), docs(1)], False),
    "l3_state_seq": (2, 3, 40, 4, True, True, [docs(3, 2), docs(3, 1)], True),
    # boundaries inside the first k-1 positions, at block and program edges (32, 64, 128), and two in a row
    "docs_strided": (2, 130, 40, 4, True, True, [docs(130, 2, 32, 64, 65, 128), docs(130, 1, 100)], True),
    "k2_docs": (2, 130, 40, 2, False, True, [docs(130, 1, 64), docs(130, 129)], True),
    "k8_docs": (1, 20, 40, 8, True, True, [docs(20, 3, 9)], False),
}


@needs_triton
@pytest.mark.parametrize("case", SMALL_CASES)
def test_matches_torch_fp32(case):
    b, l, d, k, bias, state, seq, strided = SMALL_CASES[case]
    seq_idx = None if seq is None else torch.stack(seq)
    check(make_inputs(b, l, d, k, torch.float32, bias, state, seq_idx, strided), FP32)


@needs_triton
def test_matches_torch_bf16_int32_seq_idx_and_strided_grad():
    seq_idx = torch.stack([docs(70, 2, 64, dtype=torch.int32), docs(70, 33, dtype=torch.int32)])
    inputs = make_inputs(2, 70, 200, 4, torch.bfloat16, True, True, seq_idx, strided=True)
    grad_out = torch.randn(2, 200, 70).to(DEVICE).transpose(1, 2)  # channel stride != 1
    check(inputs, 1e-2, grad_out)


@needs_triton
@pytest.mark.parametrize("blocks", [2, 3])
def test_backward_programs_of_several_blocks(blocks, monkeypatch):
    """The backward with BWD_BLOCKS time blocks of 32 per program, so that short inputs span several programs
    (program edges at multiples of 64 or 96, some on document boundaries; blocks wholly past the end)."""
    monkeypatch.setattr(conv_triton, "BWD_BLOCK_L", 32)
    monkeypatch.setattr(conv_triton, "BWD_BLOCKS", blocks)
    b, l, d, k, bias, state, seq, strided = SMALL_CASES["docs_strided"]
    check(make_inputs(b, l, d, k, torch.float32, bias, state, torch.stack(seq), strided), FP32)
    seq_idx = torch.stack([docs(70, 2, 64, dtype=torch.int32), docs(70, 33, dtype=torch.int32)])
    check(make_inputs(2, 70, 200, 4, torch.bfloat16, True, True, seq_idx, strided=True), 1e-2)


def test_rows_that_fit_one_tile_take_the_one_tile_plan(monkeypatch):
    """The backward's (channels, warps, blocks): ONE_TILE_BWD up to BWD_BLOCK_L times a row, the long-row plan past."""
    monkeypatch.setattr(conv_triton, "ONE_TILE_BWD", (16, 1, 3))
    long_plan = (conv_triton.BWD_BLOCK_D, conv_triton.BWD_WARPS, conv_triton.BWD_BLOCKS)
    assert conv_triton.backward_plan(1) == conv_triton.backward_plan(conv_triton.BWD_BLOCK_L) == (16, 1, 3)
    assert conv_triton.backward_plan(conv_triton.BWD_BLOCK_L + 1) == long_plan != (16, 1, 3)


def test_time_tiles_fit_short_rows():
    """Long rows keep the tuned tiles; a short row gets a tile of its own length and programs of several rows."""
    assert conv_triton.time_tiles(2048, 32, 4) == (32, 4, 1)
    assert conv_triton.time_tiles(70, 32, 4) == (32, 3, 1)
    assert conv_triton.time_tiles(64, 32, 4) == (32, 2, 2)
    assert conv_triton.time_tiles(32, 32, 4) == (32, 1, 4)
    assert conv_triton.time_tiles(16, 32, 4) == (16, 1, 8)
    assert conv_triton.time_tiles(3, 32, 4) == (16, 1, 8)
    assert conv_triton.time_tiles(16, 64, 1) == (16, 1, 4)


@needs_triton
@pytest.mark.parametrize("gather", [False, True], ids=["recomputed", "gathered"])
@pytest.mark.parametrize("l", [16, 24, 32, 64])
def test_programs_of_several_short_rows(l, gather, monkeypatch):
    """Short rows, several per program (a batch that the rows per program do not divide): values and the grad
    weight and bias summed over rows that share a program, with carried states and document boundaries; the
    backward's g at later times recomputed, or gathered from a whole row's g (GATHER_MAX_LEN raised or 0: rows of
    16, 24 and 32 fit one tile; 64 does not and keeps the recomputing path). The tiles at every length (rows of 17-32
    otherwise walk time: conv_scan_triton.py)."""
    monkeypatch.setattr(conv_triton, "SCAN_LENS", range(0))
    monkeypatch.setattr(conv_triton, "GATHER_MAX_LEN", 1 << 30 if gather else 0)
    b = 11
    seq_idx = torch.stack([docs(l, *(s for s in (1 + i % 5, 9 + i % 7) if s < l)) for i in range(b)])
    check(make_inputs(b, l, 40, 4, torch.float32, True, True, seq_idx, strided=True), FP32)
    check(make_inputs(b, l, 72, 4, torch.bfloat16, False, False, None, seed=3), 1e-2)


@needs_triton
@pytest.mark.parametrize("gather", [False, True], ids=["recomputed", "gathered"])
def test_rows_of_64_as_one_tile_of_64(gather, monkeypatch):
    """The sweep's BLOCK_L 64 plans (benchmarks/conv_kernel.py): rows of 64 (and 40) in one tile of 64 under the
    one-tile plan, g recomputed or gathered, with carried states and document boundaries, and without."""
    monkeypatch.setattr(conv_triton, "BWD_BLOCK_L", 64)
    monkeypatch.setattr(conv_triton, "ONE_TILE_BWD", (32, 2, 1))
    monkeypatch.setattr(conv_triton, "GATHER_MAX_LEN", 1 << 30 if gather else 0)
    for l in (64, 40):
        seq_idx = torch.stack([docs(l, 5, 37), docs(l, 1)])
        check(make_inputs(2, l, 40, 4, torch.float32, True, True, seq_idx, strided=True), FP32)
        check(make_inputs(3, l, 72, 4, torch.float32, False, False, None, seed=3), FP32)  # the row's end alone


@needs_triton
@pytest.mark.parametrize("case", ["l1_state_seq", "l3_state_seq", "k2_docs", "k8_docs"])
def test_whole_rows_gathered_match_torch_fp32(case, monkeypatch):
    """The gathered backward on the small cases whose rows fit one tile, and on one that does not (k2_docs, 130
    times: the recomputing path) with every row that fits one tile gathering: taps 2 to 8, document boundaries at every position."""
    monkeypatch.setattr(conv_triton, "GATHER_MAX_LEN", 1 << 30)
    b, l, d, k, bias, state, seq, strided = SMALL_CASES[case]
    check(make_inputs(b, l, d, k, torch.float32, bias, state, torch.stack(seq), strided), FP32)


def walk_time(monkeypatch, chunk, plan=(16, 2, 1, 3)):
    """Every row through conv_scan_triton.py's kernels, at most ``chunk`` times a program, small tiles."""
    from lightning_mamba.models.kernels import conv_scan_triton

    monkeypatch.setattr(conv_triton, "SCAN_LENS", range(1, 1 << 30))
    monkeypatch.setattr(conv_scan_triton, "TIME_CHUNK", chunk)
    monkeypatch.setattr(conv_scan_triton, "FWD_PLAN", plan)
    monkeypatch.setattr(conv_scan_triton, "BWD_PLAN", plan)


@needs_triton
@pytest.mark.parametrize("chunk", [64, 32], ids=["rows_of_one_chunk", "chunks_of_32"])
@pytest.mark.parametrize("case", SMALL_CASES)
def test_time_walking_kernels_match_torch_fp32(case, chunk, monkeypatch):
    """conv_scan_triton.py's forward and backward on every small case: rows in one program's walk, or cut into
    chunks of 32 whose edges fall on document boundaries (32, 64, 128); kernel widths 2-4 (8 takes the tiles)."""
    walk_time(monkeypatch, chunk)
    b, l, d, k, bias, state, seq, strided = SMALL_CASES[case]
    seq_idx = None if seq is None else torch.stack(seq)
    check(make_inputs(b, l, d, k, torch.float32, bias, state, seq_idx, strided), FP32)


@needs_triton
def test_time_walking_kernels_bf16_rows_and_channels_past_the_tiles(monkeypatch):
    """bf16, int32 documents, a grad of y with channel stride != 1, and a batch and channel count that the plan's
    rows (4) and channels (16) do not divide."""
    walk_time(monkeypatch, 64, plan=(16, 4, 2, 1))
    seq_idx = torch.stack([docs(21, 2, 17, dtype=torch.int32), docs(21, 9, dtype=torch.int32)] * 3)[:5]
    inputs = make_inputs(5, 21, 40, 4, torch.bfloat16, True, True, seq_idx, strided=True)
    grad_out = torch.randn(5, 40, 21).to(DEVICE).transpose(1, 2)
    check(inputs, 1e-2, grad_out)


def test_rows_of_scan_lens_walk_time_when_the_kernel_width_fits(monkeypatch):
    monkeypatch.setattr(conv_triton, "SCAN_LENS", range(17, 33))
    assert conv_triton.scanned(32, 4) and conv_triton.scanned(17, 2)
    assert not conv_triton.scanned(33, 4) and not conv_triton.scanned(24, 5)  # longer rows, wider kernels: tiles
    assert not conv_triton.scanned(16, 4) and not conv_triton.scanned(1, 4)  # rows of 16 or fewer: one tile
    monkeypatch.setattr(conv_triton, "SCAN_LENS", range(0))
    assert not conv_triton.scanned(20, 4)


@needs_triton
@pytest.mark.parametrize("walk", [False, True], ids=["tiles", "walking_time"])
@pytest.mark.parametrize("l", [12, 130], ids=["whole_row", "blocks"])
def test_grad_u_is_written_into_the_splits_buffer(l, walk, monkeypatch):
    """u as the mixer has it, a piece of grad_slots.split_last (odd row stride, columns 7..): the backward writes
    grad u into the split's gradient buffer in place (no copy of u's columns after it), on every backward path (the
    tiles' two, the time-walking one), and the gradients are the reference's."""
    from lightning_mamba.models.kernels.grad_slots import split_last

    from ...op_watch import copy_destinations

    if walk:
        walk_time(monkeypatch, 64)
    b, d, k, width = 2, 40, 4, 63
    wide = torch.randn(b, l, width, generator=torch.Generator().manual_seed(0)).to(DEVICE).requires_grad_()
    _, weight, bias, _, _ = make_inputs(b, l, d, k, torch.float32)
    seq_idx = torch.stack([docs(l, 3), docs(l, l - 2)]).to(DEVICE)
    grad_out = torch.randn(b, l, d, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    u = split_last(wide, [7, d, width - 7 - d])[1]
    out, none = causal_conv1d_silu(u, weight, bias, None, seq_idx, return_state=False)  # training: no state built
    assert none is None
    grads = []
    copies = copy_destinations(lambda: grads.extend(torch.autograd.grad(out, wide, grad_out)))
    assert (b, l, d) not in copies, copies
    grad_wide = grads[0]
    ref_u = wide.detach()[:, :, 7:7 + d].double().requires_grad_()
    ref_out, _ = reference(ref_u, weight.double(), bias.double(), None, seq_idx)
    (want,) = torch.autograd.grad(ref_out, ref_u, grad_out.double())
    assert_rel_close(grad_wide[:, :, 7:7 + d], want, FP32, "grad u")
    assert torch.count_nonzero(grad_wide[:, :, :7]) == 0 and torch.count_nonzero(grad_wide[:, :, 7 + d:]) == 0


@needs_triton
def test_state_of_another_dtype_and_no_grad():
    """A fp32 conv_state with fp16 u is taken as u's values; under no_grad the output needs no graph."""
    u, weight, bias, conv_state, _ = make_inputs(1, 9, 40, 4, torch.float16, state=True)
    with torch.no_grad():
        out, state = causal_conv1d_silu(u, weight, bias, conv_state.float())
        ref_out, ref_state = reference(u.float(), weight, bias, conv_state.float(), None)
    assert not out.requires_grad
    assert_rel_close(out, ref_out, 1e-2, "out")
    assert_rel_close(state, ref_state, 0.0, "new_state")


@needs_triton
def test_conv_state_requiring_grad_is_refused():
    u, weight, bias, conv_state, _ = make_inputs(1, 8, 40, 4, torch.float32, state=True)
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d_silu(u, weight, bias, conv_state.requires_grad_())
    with torch.no_grad():  # no graph, so nothing to refuse
        causal_conv1d_silu(u, weight, bias, conv_state)


@pytest.mark.gpu  # realistic shapes, mamba_ssm: CUDA only
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch_realistic_shape(dtype):
    seq_idx = torch.stack([docs(2048, 2, 700, 1024), docs(2048, 1500)])
    # the model's layout: xBC is a column slice of in_proj's output, 3352 wide (a multiple of 8, not of 16)
    inputs = make_inputs(2, 2048, 1792, 4, dtype, True, True, seq_idx, strided=True, width=3352)
    check(inputs, FP32 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu  # realistic shapes: CUDA only
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("l", [32, 64, 2048], ids=["study_512_32", "study_1024_64", "130m"])
def test_time_walking_kernels_match_torch_realistic_shape(dtype, l, monkeypatch):
    """The time-walking kernels at the module's own plans on the GPU: study cells' convs (d_state 512, LEN 32: 1536
    channels of a 2064-wide in_proj output, 34 rows, which two-row programs share; d_state 1024, LEN 64: 2560 of
    3088) and the 130m shape's long rows in chunks of TIME_CHUNK."""
    monkeypatch.setattr(conv_triton, "SCAN_LENS", range(1, 1 << 30))
    b, d, width = {32: (34, 1536, 2064), 64: (32, 2560, 3088), 2048: (2, 1792, 3352)}[l]
    seq_idx = torch.stack([docs(l, 2, l // 3, l // 2 + 1), docs(l, l - 5)] * (b // 2))
    inputs = make_inputs(b, l, d, 4, dtype, True, True, seq_idx, strided=True, width=width)
    check(inputs, FP32 if dtype == torch.float32 else 1e-2)


def test_module_imports_without_triton_or_cuda():
    assert isinstance(conv_triton.available(), bool)
    if DEVICE != "cuda":
        assert not conv_triton.available()


def test_the_rows_ours_takes_beside_the_library_are_the_rows_that_walk_time():
    """With causal_conv1d installed the model keeps our conv for rows of at most backend.OURS_CONV_MAX_LEN tokens,
    measured as the walk through time beating the library there: the walk must take exactly those rows (from one
    token), or some of them would run on the tiles that lost."""
    from lightning_mamba.models.kernels import backend

    assert conv_triton.SCAN_LENS == range(1, backend.OURS_CONV_MAX_LEN + 1)
    assert conv_triton.scanned(1, 4) and conv_triton.scanned(backend.OURS_CONV_MAX_LEN, 4)
