"""benchmarks/conv_kernel.py on CPU: its inputs are the mixer's layout, its correctness check passes the reference and
catches a wrong conv, and the whole check-time-print run works with causal_conv1d absent (or, where its source is
unpacked in .carry/, with the library's own torch reference standing in for its CUDA kernels)."""

import importlib.util
import os
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CC1D_SRC = os.path.join(ROOT, ".carry", "causal_conv1d-1.7.0", "causal_conv1d", "causal_conv1d_interface.py")


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = load_benchmark("conv_kernel")
# a small mixer whose layout causal_conv1d's channel-last kernels accept: conv_dim 48, row stride 88
TINY = bench.Shape("tiny", batch=2, seq_len=24, d_model=16, d_state=8, headdim=4)


def test_inputs_are_the_mixers_layout():
    inp = bench.make_inputs(TINY, "cpu", torch.float32)
    assert (TINY.conv_dim, TINY.width) == (48, 88)
    assert inp.u.shape == (2, 24, 48) and inp.u.stride() == (24 * 88, 88, 1)  # a strided column slice, no copy
    assert inp.u.data_ptr() == inp.wide.data_ptr() + TINY.d_inner * 4 and inp.u.requires_grad
    assert inp.weight.shape == (48, 1, 4) and inp.bias.shape == (48,) and inp.weight.dtype == torch.float32
    assert inp.seq_idx.dtype == torch.int32 and inp.seq_idx[0].unique().tolist() == [0, 1, 2]
    assert inp.conv_state.shape == (2, 48, 3) and inp.conv_state.is_contiguous()
    assert inp.x_step.shape == (2, 48) and inp.x_step.stride() == (88, 1)
    # the same seed gives the same values in another dtype (the check runs in fp32, the timing in bf16)
    assert torch.equal(bench.make_inputs(TINY, "cpu", torch.bfloat16).u.float(), inp.u.to(torch.bfloat16).float())
    study = bench.SHAPES["study"]
    assert {s.batch * s.seq_len for s in study} == {16384} and {s.seq_len for s in study} == {32, 64, 512}
    assert (bench.SHAPES["130m"][0].conv_dim, bench.SHAPES["130m"][0].width) == (1792, 3352)


def test_reference_against_itself_is_ok_and_a_wrong_conv_fails():
    inp = bench.make_inputs(TINY, "cpu", torch.float32)
    for case in bench.CASES:
        ok, msg = bench.check_training(bench.torch_conv, inp, case)
        assert ok, (case, msg)
    assert bench.check_step(bench.torch_step, inp)[0]  # Mamba2.step's ops equal models/conv.py on one token

    def shifted(u, weight, bias, state, seq_idx):  # taps one step off
        return bench.torch_conv(u, weight.flip(-1), bias, state, seq_idx)

    ok, msg = bench.check_training(shifted, inp, "plain")
    assert not ok and msg.startswith("FAIL")
    assert bench.safely(bench.check_training, lambda *a: 1 / 0, inp, "plain")[1].startswith("ERROR ZeroDivisionError")


def test_run_without_causal_conv1d_prints_every_row(capsys):
    status = bench.run([TINY], "cpu", torch.float32, torch.float32, bench.wall_timer, lib=None)
    out = capsys.readouterr().out
    assert status == 0, out
    rows = [line for line in out.splitlines() if line.startswith("tiny")]
    assert len(rows) == len(bench.CASES) * 2 + 1  # fwd and fwd+bwd per training case, one decode step
    assert all("not inst." in r and r.endswith("causal_conv1d not installed") for r in rows)
    assert "which to use where" in out


def test_main_without_cuda_exits_with_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="run it on a machine with a GPU"):
        bench.main([])


def test_unsupported_layout_is_named_not_failed(capsys):
    odd = bench.Shape("odd", batch=2, seq_len=8, d_model=16, d_state=8, headdim=8)  # row stride 84
    status = bench.run([odd], "cpu", torch.float32, torch.float32, bench.wall_timer, lib=_reference_library())
    out = capsys.readouterr().out
    assert status == 0 and "unsupport" in out, out


def _reference_library():
    """causal_conv1d's own torch references (causal_conv1d_ref, causal_conv1d_update_ref) as its fn and update,
    loaded from the unpacked 1.7.0 source with its CUDA extension stubbed; a plain stand-in when absent."""
    if not os.path.exists(CC1D_SRC):
        return types.SimpleNamespace(causal_conv1d_fn=None, causal_conv1d_update=None)
    stub = types.ModuleType("causal_conv1d.cpp_functions")
    stub.causal_conv1d_fwd_function = stub.causal_conv1d_bwd_function = stub.causal_conv1d_update_function = None
    saved = {k: sys.modules.get(k) for k in ("causal_conv1d", "causal_conv1d.cpp_functions")}
    sys.modules["causal_conv1d"] = types.ModuleType("causal_conv1d")
    sys.modules["causal_conv1d.cpp_functions"] = stub
    try:
        spec = importlib.util.spec_from_file_location("cc1d_interface", CC1D_SRC)
        iface = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(iface)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return types.SimpleNamespace(causal_conv1d_fn=iface.causal_conv1d_ref,
                                 causal_conv1d_update=iface.causal_conv1d_update_ref)


@pytest.mark.skipif(not os.path.exists(CC1D_SRC), reason="causal-conv1d 1.7.0 source not unpacked in .carry/")
def test_our_causal_conv1d_calls_match_the_librarys_reference(capsys):
    """The keyword calls, layouts, seq_idx and carried-state rules of cc1d_conv / cc1d_step agree with the
    library's reference semantics (what its kernels are tested against), in every case."""
    lib = _reference_library()
    inp = bench.make_inputs(TINY, "cpu", torch.float32)
    for case in bench.CASES:
        ok, msg = bench.check_training(lambda *a: bench.cc1d_conv(lib, *a), inp, case)
        assert ok, (case, msg)
    assert bench.check_step(lambda *a: bench.cc1d_step(lib, *a), inp)[0]
    status = bench.run([TINY], "cpu", torch.float32, torch.float32, bench.wall_timer, lib=lib)
    out = capsys.readouterr().out
    assert status == 0 and "not inst." not in out, out
