"""benchmarks/conv_kernel.py on CPU: its inputs are the mixer's layout, its correctness check passes the reference and
catches a wrong conv, and the whole check-time-print run works with causal_conv1d absent, or with a torch stand-in
for its kernels (tests/cc1d_stand_in.py) behind the model's adapter."""

import importlib.util
import os
import sys

import pytest
import torch

from lightning_mamba.models.kernels import conv_cc1d
from tests.cc1d_stand_in import stand_in_library
from tests.models.kernels.triton_env import DEVICE, needs_triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_a_timing_that_raises_is_reported_untimed_and_the_run_goes_on(capsys):
    """A contender the timer cannot time (on a GPU: a kernel a CUDA graph cannot capture) is named with the error's
    first line and shown as untimed; the others are still timed and a correct contender is not a FAIL."""
    def timer(fn):
        if timer.calls == 0:
            timer.calls += 1
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")
        return bench.wall_timer(fn)

    timer.calls = 0
    status = bench.run([TINY], "cpu", torch.float32, torch.float32, timer, lib=None)
    out = capsys.readouterr().out
    assert status == 0, out
    assert "# tiny plain torch: not timed: CUDA error: operation not permitted when stream is capturing" in out, out
    assert "more detail" not in out
    plain = [line for line in out.splitlines() if line.startswith("tiny") and " plain " in line]
    assert len(plain) == 2 and all("untimed" in line for line in plain), plain
    assert not any("untimed" in line for line in out.splitlines() if line.startswith("tiny") and "seq_idx" in line)


def test_main_without_cuda_exits_with_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="run it on a machine with a GPU"):
        bench.main([])


def test_unsupported_layout_is_named_not_failed(capsys):
    odd = bench.Shape("odd", batch=2, seq_len=8, d_model=16, d_state=8, headdim=8)  # row stride 84
    status = bench.run([odd], "cpu", torch.float32, torch.float32, bench.wall_timer, lib=stand_in_library())
    out = capsys.readouterr().out
    assert status == 0 and "unsupport" in out, out


def test_causal_conv1d_contender_is_the_models_adapter(capsys):
    """The cc1d columns time models/kernels/conv_cc1d.py (what the model runs), here on a torch stand-in for the
    library (its CUDA kernels cannot run here; tests/models/kernels/test_conv_cc1d.py checks the adapter itself):
    it agrees with models/conv.py in every case and the whole run reports no FAIL."""
    lib = stand_in_library()
    train_fn, step_fn = bench.contenders("cpu", lib, "")["cc1d"]
    assert (train_fn.func, step_fn.func) == (conv_cc1d.conv1d_silu, conv_cc1d.conv1d_silu_step)
    inp = bench.make_inputs(TINY, "cpu", torch.float32)
    for case in bench.CASES:
        ok, msg = bench.check_training(train_fn, inp, case)
        assert ok, (case, msg)
    assert bench.check_step(step_fn, inp)[0]
    # the library's autograd Function where a final state is asked, its forward/backward entry points elsewhere
    assert {c["fn"] for c in lib.calls} == {"causal_conv1d_fn", "causal_conv1d_fwd_function",
                                            "causal_conv1d_bwd_function", "causal_conv1d_update"}
    status = bench.run([TINY], "cpu", torch.float32, torch.float32, bench.wall_timer, lib=lib)
    out = capsys.readouterr().out
    assert status == 0 and "not inst." not in out and "FAIL" not in out, out


@needs_triton
def test_gathered_rows_are_checked_on_every_case_then_timed_both_ways(capsys, monkeypatch):
    """The A/B of conv_triton.GATHER_MAX_LEN (rows of 24 fit one backward tile): checks pass, the setting is put
    back, and a kernel that gets it wrong fails the check."""
    from lightning_mamba.models.kernels import conv_triton

    before = conv_triton.GATHER_MAX_LEN
    inp = bench.make_inputs(TINY, DEVICE, torch.float32)
    assert bench.print_gathered_rows(inp, torch.float32, DEVICE, bench.wall_timer)
    out = capsys.readouterr().out
    assert "whole rows gathered (tiny): check plain ok" in out and "state+seq_idx ok" in out and "x)" in out
    assert conv_triton.GATHER_MAX_LEN == before
    monkeypatch.setattr(conv_triton, "_bwd_whole_row", conv_triton._bwd_row)  # a wrong body: its arguments differ
    assert not bench.print_gathered_rows(inp, torch.float32, DEVICE, bench.wall_timer)


@needs_triton
def test_tile_sweep_checks_each_plan_and_puts_the_tiles_back(capsys, monkeypatch):
    """--sweep: every backward plan is checked on every training case before it is timed, the module's tiles are
    restored, and a plan whose kernel gets it wrong is reported as a FAIL."""
    from lightning_mamba.models.kernels import conv_triton

    before = (conv_triton.BWD_BLOCK_L, conv_triton.BWD_BLOCK_D, conv_triton.BWD_WARPS, conv_triton.BWD_BLOCKS,
              conv_triton.FWD_BLOCK_L, conv_triton.FWD_BLOCK_D, conv_triton.FWD_WARPS, conv_triton.GATHER_MAX_LEN,
              conv_triton.ONE_TILE_BWD)
    inp = bench.make_inputs(TINY, DEVICE, torch.float32)
    plans = [(32, 64, 4, 1), (16, 32, 2, 2)]
    assert bench.sweep(inp, torch.float32, DEVICE, bench.wall_timer, plans)
    out = capsys.readouterr().out
    assert "tiny: bwd tiles (32, 64, 4, 1) (tile, tiles, rows per program (32, 1, 1)): fwd+bwd" in out, out
    assert "(32, 1, 1)) gathered: fwd+bwd" in out, out  # a row in one tile: also g gathered along it
    assert "(16, 32, 2, 2) (tile, tiles, rows per program (16, 2, 1))" in out and "FAIL" not in out
    assert "(16, 2, 1)) gathered" not in out  # a row over two tiles has nothing to gather
    after = (conv_triton.BWD_BLOCK_L, conv_triton.BWD_BLOCK_D, conv_triton.BWD_WARPS, conv_triton.BWD_BLOCKS,
             conv_triton.FWD_BLOCK_L, conv_triton.FWD_BLOCK_D, conv_triton.FWD_WARPS, conv_triton.GATHER_MAX_LEN,
             conv_triton.ONE_TILE_BWD)
    assert after == before
    monkeypatch.setattr(conv_triton, "_bwd_row", conv_triton._bwd_whole_row)  # a wrong body
    monkeypatch.setattr(conv_triton, "GATHER_MAX_LEN", 0)
    assert not bench.sweep(inp, torch.float32, DEVICE, bench.wall_timer, [(32, 64, 4, 1)])
    assert "FAIL" in capsys.readouterr().out


def test_the_table_timer_is_do_bench_unless_graph_is_asked():
    """--timer picks the table's timer: triton's do_bench by default, CUDA graph replays (GPU time only) for graph;
    an unknown timer is refused by the parser."""
    assert bench.TIMERS[bench.parse_args([]).timer] is bench.cuda_timer
    assert bench.TIMERS[bench.parse_args(["--timer", "graph"]).timer] is bench.graph_timer
    with pytest.raises(SystemExit):
        bench.parse_args(["--timer", "wall"])


@needs_triton
def test_scan_sweep_checks_each_plan_against_tiles_and_the_library_and_puts_the_settings_back(capsys, monkeypatch):
    """--scan: the tile kernels and causal_conv1d (here the torch stand-in behind the model's adapter) are timed as
    baselines, each plan of the time-walking kernels is checked, then timed with its ratios, the module's settings
    are put back, and a walk that computes the wrong thing is a FAIL."""
    from lightning_mamba.models.kernels import conv_scan_triton, conv_triton

    before = conv_triton.SCAN_LENS, conv_scan_triton.FWD_PLAN, conv_scan_triton.BWD_PLAN
    inp = bench.make_inputs(TINY, DEVICE, torch.float32)
    plans = [(16, 2, 1, 3), (32, 1, 2, 1)]
    assert bench.scan_sweep(inp, torch.float32, DEVICE, bench.wall_timer, stand_in_library(), plans)
    out = capsys.readouterr().out
    assert "tiny: tiles: plain fwd" in out and "tiny: cc1d: plain fwd" in out, out
    assert "tiny: scan (16, 2, 1, 3) (times a program 24): plain fwd" in out and "x tiles, " in out and "x cc1d)" in out
    assert "; seq_idx fwd+bwd" in out.split("scan (16, 2, 1, 3)")[1].splitlines()[0]  # the first plan: documents too
    assert "tiny: scan (32, 1, 2, 1)" in out and "tiny: fastest scan plan" in out and "FAIL" not in out
    assert (conv_triton.SCAN_LENS, conv_scan_triton.FWD_PLAN, conv_scan_triton.BWD_PLAN) == before

    def uncapturable(fn):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    assert bench.scan_sweep(inp, torch.float32, DEVICE, uncapturable, None, plans[:1])  # untimed is not a FAIL
    out = capsys.readouterr().out
    assert "tiny: tiles: not timed: CUDA error" in out and "tiny: scan (16, 2, 1, 3): not timed: CUDA error" in out, out
    walk = conv_scan_triton.forward
    monkeypatch.setattr(conv_scan_triton, "forward", lambda *args: walk(*args) * 1.01)
    assert not bench.scan_sweep(inp, torch.float32, DEVICE, bench.wall_timer, None, plans[:1])
    assert "tiny: scan (16, 2, 1, 3): FAIL" in capsys.readouterr().out


def test_the_scan_sweep_starts_with_the_modules_own_plan(monkeypatch):
    """--scan checks the plan the model runs on every case: the module's, whatever it is, then the sweep's others once
    each."""
    from lightning_mamba.models.kernels import conv_scan_triton

    for plan in (conv_scan_triton.BWD_PLAN, (8, 1, 1, 1), bench.SCAN_SWEEP[-1]):
        monkeypatch.setattr(conv_scan_triton, "BWD_PLAN", plan)
        plans = bench.scan_plans()
        assert plans[0] == plan and len(plans) == len(set(plans)) and set(bench.SCAN_SWEEP) <= set(plans)
