"""The benchmarks' CPU smoke runs: benchmarks/cell_throughput.py times the real `lightning-mamba fit` (fit_1cell)
beside the bare eager baseline, in one process."""

import importlib.util
import json
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # fit_1cell's StepTimer is named cell_throughput.StepTimer: this module, not a copy
    spec.loader.exec_module(module)
    return module


def test_cell_throughput_times_the_real_fit_beside_the_eager_baseline(tmp_path, corpus, capsys, monkeypatch):
    bench = load_benchmark("cell_throughput")
    monkeypatch.chdir(tmp_path)  # the CLI's relative paths (none expected) land here, not in the repo
    out = tmp_path / "cells.json"
    code = bench.main(["--device", "cpu", "--steps", "3", "--warmup", "1", "--window", "3", "--d_state", "16",
                       "--seq_len", "32", "--tokens_per_step", "256", "--d_model", "32", "--n_layer", "2",
                       "--headdim", "16", "--chunk_size", "32", "--contenders", "eager_1cell,fit_1cell",
                       "--fit_source", corpus, "--fit_cache_dir", str(tmp_path / "cache"), "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    rows = {r["contender"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"eager_1cell", "fit_1cell"}
    assert all(r["failed_cells"] == 0 and r["steps_per_s"] > 0 for r in rows.values()), printed
    fit = rows["fit_1cell"]["per_cell"][0]
    assert fit["lightning_module"] == "lightning_mamba.training.module.MambaLitModule"
    assert fit["vocab_size"] == 257 and fit["global_step"] == 4 and len(fit["window_steps_per_s"]) == 1
    # the config's callback list was replaced: no evaluations, no checkpoints; the training-time monitors stay
    assert {"StepTimer", "NanGuard", "TokenThroughputMonitor", "LearningRateMonitor"} <= set(fit["callbacks"])
    assert not set(fit["callbacks"]) & set(bench.FIT_LEFT_OUT)
    assert rows["fit_1cell"]["check_ok"] is None  # no check against eager: "-" in the table
    assert "fit_1cell" in printed.split("targets:")[1]
    assert not (tmp_path / "runs").exists()  # the logger wrote to a temporary folder


def test_fit_host_time_splits_the_real_fit_step_by_part(tmp_path, corpus, capsys, monkeypatch):
    bench = load_benchmark("fit_host_time")
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--device", "cpu", "--steps", "4", "--warmup", "2", "--fit_source", corpus,
                       "--fit_cache_dir", str(tmp_path / "cache"), "--clock", "cpu"]) == 0
    printed = capsys.readouterr().out.split("# cpu:")[1]
    parts = [line.split("  ")[-1] for line in printed.splitlines()[3:]]
    # Lightning's hooks, our parts and the loop itself, per step; the timers are undone after the run
    assert {"[Callback]NanGuard.on_before_optimizer_step", "clipping by the NaN guard's norm (clip_grads_with_norm_)",
            "outside every timed part (Lightning's loop)"} <= set(parts), printed
    # none of the timed steps is a logging step (every 50th): no self.log at all (MambaLitModule.log_step)
    assert "self.log (Lightning's bookkeeping)" not in parts, printed
    assert not any(p.startswith("clip_grad_norm_") for p in parts), printed  # the norm is computed once a step
    assert not hasattr(__import__("lightning").LightningModule.log, "__wrapped__") and not bench._ACTIVE


@pytest.mark.gpu
def test_cell_throughput_streams_run_every_cell_in_one_process_and_check_each(tmp_path, capsys):
    """graph_Nstreams: two different cells in this process, each whole-step graph checked against eager."""
    bench = load_benchmark("cell_throughput")
    out = tmp_path / "cells.json"
    code = bench.main(["--steps", "4", "--warmup", "1", "--window", "2", "--tokens_per_step", "512", "--d_model", "64",
                       "--n_layer", "2", "--headdim", "16", "--chunk_size", "32", "--cells", "2", "--states", "16,32",
                       "--lens", "32,64", "--vocab", "257", "--contenders", "graph_Nstreams", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    row = json.loads(out.read_text())["results"][0]
    assert row["contender"] == "graph_Nstreams" and row["failed_cells"] == 0 and row["check_ok"] is True, printed
    cells = row["per_cell"]
    assert [(c["d_state"], c["seq_len"]) for c in cells] == [(16, 32), (32, 64)]
    assert all(c["one_process"] and c["steps_per_s"] > 0 for c in cells)
    assert row["total_tokens_per_s"] == pytest.approx(sum(c["tokens_per_s"] for c in cells))


def test_profile_step_takes_a_study_cell_and_its_scan_settings(capsys):
    """benchmarks/profile_step.py --config cell: the study's 4 x 256 byte model at a chosen d_state / LEN, ours with
    the attention-form scan; on the CPU a smoke run grouping the ops' own time."""
    bench = load_benchmark("profile_step")
    groups = bench.main(["--config", "cell", "--device", "cpu", "--d_model", "32", "--n_layer", "1", "--d_state", "8",
                         "--headdim", "16", "--seq_len", "16", "--tokens_per_step", "64", "--quadratic_max_len", "16",
                         "--steps", "1", "--top", "3", "--ops", "4"])["ours"]
    printed = capsys.readouterr().out
    assert "(32, 1, 8, 257, 4, 16, 16)" in printed and "'quadratic_max_len': 16" in printed, printed
    ops_table = printed.split("top 4 torch ops by their own CPU time (1 steps):")[1]
    assert "Input Shapes" in ops_table and "aten::" in ops_table, printed
    assert groups["total"] > 0 and groups["matmul"] > 0 and groups["wall"] > 0
    with pytest.raises(SystemExit, match="not a multiple of --seq_len 16"):
        bench.main(["--config", "cell", "--device", "cpu", "--seq_len", "16", "--tokens_per_step", "100"])
    # a contender that cannot run here is named as skipped and the others still run
    results = bench.main(["--config", "cell", "--device", "cpu", "--d_model", "32", "--n_layer", "1", "--d_state",
                          "8", "--headdim", "16", "--seq_len", "16", "--tokens_per_step", "64", "--steps", "1",
                          "--top", "3", "--contenders", "mamba_ssm_fused,ours"])
    assert list(results) == ["ours"] and "== mamba_ssm_fused\n  skipped (" in capsys.readouterr().out


def test_cell_benchmark_steps_build_no_final_state_as_training_does():
    """The benchmarks' steps ask the model for no final state, as the training step does: in the attention form
    that tensor (rows x heads x headdim x d_state) would be the largest one of the step (at d_state 2048, LEN 16,
    4 GB per layer), so a benchmark that built it would time a step training never takes."""
    import torch

    from .op_watch import OpWatch, tensors

    bench = load_benchmark("cell_throughput")
    throughput = load_benchmark("train_throughput")
    rows, seq_len, d_state, heads, headdim = 3, 16, 40, 4, 16
    args = bench.parse_args(["--device", "cpu", "--backend", "torch", "--d_model", "32", "--n_layer", "1",
                             "--headdim", str(headdim), "--quadratic_max_len", str(seq_len), "--vocab", "257"])
    model = bench.build_model(args, d_state, "cpu")
    state_size = rows * heads * headdim * d_state

    def sizes_seen(step) -> set[int]:
        """The sizes (numel) of every tensor the step's ops make."""
        seen = set()
        with OpWatch(lambda func, args, out: seen.update(t.numel() for t in tensors(out))):
            step()
        return seen

    window = torch.randint(0, 257, (rows, seq_len + 1))
    opt = bench.make_optimizer(model, args, "cpu")
    params = list(model.parameters())
    # the check itself: a loss that returns the state builds it
    assert state_size in sizes_seen(lambda: model.loss(window[:, :-1], window[:, 1:]))
    assert state_size not in sizes_seen(lambda: bench.train_step(model, opt, params, window, bench.autocast("cpu")))
    cfg = (32, 1, d_state, 257, rows, seq_len, headdim)
    ours, loss_fn = throughput.build_bare("ours", cfg, "cpu", {"quadratic_max_len": seq_len})
    assert state_size not in sizes_seen(lambda: loss_fn(ours, window[:, :-1], window[:, 1:]).backward())


def test_cell_throughput_ratios_name_the_eager_baseline_in_either_scan_form(capsys):
    bench = load_benchmark("cell_throughput")

    def row(name: str, steps: float) -> dict:
        return {"contender": name, "cells": 1, "steps_per_s": steps, "steps_per_s_min": steps,
                "steps_per_s_max": steps, "tokens_per_s_per_cell": steps * 512, "total_tokens_per_s": steps * 512,
                "peak_gib": 0.1, "check_ok": None, "failed_cells": 0}

    bench.print_table([row("eager_1cell_quadratic", 50.0), row("graph_1cell_quadratic", 125.0)], 512, {})
    out = capsys.readouterr().out
    graphed = next(line for line in out.splitlines() if line.startswith("graph_1cell_quadratic"))
    assert graphed.split()[7] == "2.50" and "eager_1cell_quadratic's" in out


def test_norm_kernel_checks_every_contender_and_catches_a_wrong_norm(capsys):
    import torch

    bench = load_benchmark("norm_kernel")
    assert bench.main(["--device", "cpu", "--shape", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "tiny   add    torch      ok" in out and "tiny   gated  torch      ok" in out
    assert "mamba_ssm: skipped" in out
    tiny = bench.SHAPES["tiny"]

    def eps_too_large(h, residual, weight):  # a norm off by its epsilon only
        res = (h + residual).float()
        return (res * torch.rsqrt(res.pow(2).mean(-1, keepdim=True) + 1e-2) * weight).to(h.dtype), res

    ok, text = bench.check(eps_too_large, "add", tiny, "cpu")
    assert not ok and text.startswith("FAIL (") and "Error" not in text  # a wrong value, not a crash
    ok, text = bench.check(lambda *a: 1 / 0, "gated", tiny, "cpu")
    assert not ok and "ZeroDivisionError" in text


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="our norms run here only in Triton's interpreter")
def test_norm_kernel_sweep_times_every_plan_and_puts_the_plan_back(capsys):
    from lightning_mamba.models.kernels import norm_triton

    bench = load_benchmark("norm_kernel")
    before = dict(norm_triton.PLANS)
    assert bench.main(["--device", "cpu", "--shape", "tiny", "--sweep"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("tiny") and " ok (" in line]
    plans = 1
    for values in bench.SWEEP.values():
        plans *= len(values)
    assert len(rows) == 2 * plans and sum("(default)" in r for r in rows) == 2
    assert out.count("fastest backward") == 2
    assert norm_triton.PLANS == before


def test_train_throughput_leaves_nothing_of_a_lightning_run_once_collected():
    """Between contenders train_throughput collects garbage before emptying the CUDA cache: a Lightning run's module
    (with its CUDA graphs and their memory pools on a GPU) is held only by reference cycles, so once collected it is
    gone. (On the H200 a third 370m contender ran out of memory while two earlier graphed runs' pools were held.)"""
    import argparse
    import gc

    from lightning_mamba.training.module import MambaLitModule

    def modules() -> int:
        return sum(isinstance(o, MambaLitModule) for o in gc.get_objects())

    throughput = load_benchmark("train_throughput")
    gc.collect()
    before = modules()
    args = argparse.Namespace(warmup=1, steps=2, loader_workers=0)
    assert throughput.lightning_run(args, (32, 1, 16, 257, 2, 32, 16), "cpu", "32-true") > 0
    assert modules() > before  # the run's module, still in its cycles
    gc.collect()
    assert modules() == before


# cell_throughput.py's arguments for a one-step CPU run of a tiny cell (the contenders added by each test)
CELL_SMOKE = ["--device", "cpu", "--backend", "torch", "--d_state", "16", "--seq_len", "32", "--tokens_per_step", "64",
              "--vocab", "257", "--steps", "1", "--window", "1", "--warmup", "1"]


def test_cell_throughput_quadratic_torch_contenders_run_the_torch_form(monkeypatch, capsys):
    """<contender>_quadratic_torch runs the attention form in torch (backend.quadratic_kernels("torch")),
    <contender>_quadratic_blocked in the 64-token-block kernels ("blocked") and <contender>_quadratic the fused
    kernels, each with quadratic_max_len raised to its LEN."""
    from lightning_mamba.models.kernels import backend

    bench = load_benchmark("cell_throughput")
    assert bench.contender_setting("graph_1cell_quadratic_torch") == ("graph_1cell", True)
    assert bench.contender_setting("graph_1cell_quadratic_blocked_tritonconv") == ("graph_1cell", True)
    assert bench.contender_setting("graph_Ncells_quadratic_torch") == ("graph_Ncells_quadratic_torch", False)
    seen = []

    def run_cell(args, kind, d_state, seq_len):
        seen.append((kind, args.quadratic_max_len, backend._kernel_choice["attention-form"]))
        raise RuntimeError("recorded")  # the benchmark reports a contender's failure and goes on

    monkeypatch.setattr(bench, "run_cell", run_cell)
    bench.main([*CELL_SMOKE, "--contenders", "eager_1cell,eager_1cell_quadratic,eager_1cell_quadratic_torch,"
                "eager_1cell_quadratic_blocked"])
    assert seen == [("eager", 0, "ours"), ("eager", 32, "ours"), ("eager", 32, "torch"), ("eager", 32, "blocked")]
    assert backend._kernel_choice["attention-form"] == "ours"


def test_cell_throughput_splitcat_contenders_run_torch_splits(monkeypatch):
    """<1-cell contender>_splitcat runs with grad_slots.in_place(False) (torch.split's concatenating backward),
    combinable with the quadratic suffixes; the in-place default is back afterwards."""
    from lightning_mamba.models.kernels import backend, grad_slots

    bench = load_benchmark("cell_throughput")
    assert bench.contender_setting("graph_1cell_quadratic_torch_splitcat") == ("graph_1cell", True)
    assert bench.contender_setting("graph_1cell_splitcat") == ("graph_1cell", False)
    assert bench.contender_setting("graph_Nstreams_splitcat") == ("graph_Nstreams_splitcat", False)  # refused later
    seen = []

    def run_cell(args, kind, d_state, seq_len):
        seen.append((kind, args.quadratic_max_len, backend._kernel_choice["attention-form"], grad_slots._in_place))
        raise RuntimeError("recorded")

    monkeypatch.setattr(bench, "run_cell", run_cell)
    bench.main([*CELL_SMOKE, "--contenders", "eager_1cell_splitcat,eager_1cell_quadratic_torch_splitcat,eager_1cell"])
    assert seen == [("eager", 0, "ours", False), ("eager", 32, "torch", False), ("eager", 0, "ours", True)]
    assert grad_slots._in_place


def test_cell_throughput_torchembedding_and_remadescores_contenders_switch_one_kernel_each(monkeypatch):
    """<1-cell contender>_torchembedding runs with torch's embedding backward (backend.embedding_kernels("torch")),
    _remadescores with the chunked scan's scores made again in the backward (ssd_chunked_mamba.scores_kept(False)),
    _tritonconv with our conv at every row length (backend.ours_conv_max_len), _libconv with causal_conv1d's at every
    length, in any order with the other modifiers;
    the defaults are back afterwards."""
    from lightning_mamba.models.kernels import backend, ssd_chunked_mamba

    bench = load_benchmark("cell_throughput")
    assert bench.contender_setting("graph_1cell_savestates_remadescores_torchembedding") == ("graph_1cell", False)
    assert bench.contender_setting("graph_1cell_quadratic_torchembedding") == ("graph_1cell", True)
    assert bench.contender_setting("graph_1cell_quadratic_tritonconv") == ("graph_1cell", True)
    assert bench.contender_setting("graph_Ncells_torchembedding") == ("graph_Ncells_torchembedding", False)  # refused
    kept = ssd_chunked_mamba.CB_KEPT_UP_TO
    seen = []

    def run_cell(args, kind, d_state, seq_len):
        seen.append((backend._kernel_choice["embedding"], ssd_chunked_mamba.CB_KEPT_UP_TO, args.save_chunk_states,
                     backend.OURS_CONV_MAX_LEN))
        raise RuntimeError("recorded")

    monkeypatch.setattr(bench, "run_cell", run_cell)
    bench.main([*CELL_SMOKE, "--contenders", "eager_1cell_torchembedding,eager_1cell_remadescores_savestates,"
                "eager_1cell_savestates_torchembedding_remadescores,eager_1cell,eager_1cell_quadratic_tritonconv,"
                "eager_1cell_quadratic_libconv"])
    conv = backend.OURS_CONV_MAX_LEN
    assert seen == [("torch", kept, False, conv), ("ours", 0.0, True, conv), ("torch", 0.0, True, conv),
                    ("ours", kept, False, conv), ("ours", kept, False, 1 << 30), ("ours", kept, False, 0)]
    assert backend._kernel_choice["embedding"] == "ours" and ssd_chunked_mamba.CB_KEPT_UP_TO == kept > 0
    assert backend.OURS_CONV_MAX_LEN == conv == 32
    with pytest.raises(SystemExit):
        bench.main([*CELL_SMOKE, "--contenders", "graph_Ncells_remadescores"])


def test_cell_throughput_refuses_a_contender_asking_for_both_convs(capsys):
    bench = load_benchmark("cell_throughput")
    with pytest.raises(SystemExit):
        bench.parse_args([*CELL_SMOKE, "--contenders", "eager_1cell,eager_1cell_quadratic_libconv_tritonconv"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "eager_1cell_quadratic_libconv_tritonconv ask for two convs" in err and "eager_1cell," not in err
    assert bench.parse_args([*CELL_SMOKE, "--contenders", "eager_1cell_libconv,eager_1cell_tritonconv"])


def test_cell_throughput_graphupdate_is_the_fits_setting(capsys):
    """fit_1cell_graphupdate runs the fit with --model.cuda_graph_update true on CUDA (off on a CPU, where the fit has
    no graphs); the suffix on another contender is refused with one line."""
    bench = load_benchmark("cell_throughput")
    args = bench.parse_args([*CELL_SMOKE, "--contenders", "fit_1cell,fit_1cell_graphupdate"])
    flags = {}
    for name in args.contenders:
        for device in ("cuda", "cpu"):
            argv = bench.fit_argv(bench.with_settings(bench.argparse.Namespace(**{**vars(args), "device": device}),
                                                      name), "/tmp/x", 1)
            flags[name, device] = argv[argv.index("--model.cuda_graph_update") + 1]
    assert flags == {("fit_1cell", "cuda"): "false", ("fit_1cell", "cpu"): "false",
                     ("fit_1cell_graphupdate", "cuda"): "true", ("fit_1cell_graphupdate", "cpu"): "false"}
    with pytest.raises(SystemExit):
        bench.parse_args([*CELL_SMOKE, "--contenders", "lossgraph_1cell_graphupdate"])
    assert "_graphupdate is a setting of the fit" in capsys.readouterr().err


def test_cell_throughput_savestates_contenders_save_the_chunk_states(monkeypatch):
    """<1-cell contender>_savestates builds its model with save_chunk_states, before or after _splitcat and beside
    the quadratic suffixes; --save_chunk_states turns it on for every contender. The models built are checked."""
    from lightning_mamba.models.kernels import grad_slots

    bench = load_benchmark("cell_throughput")
    assert bench.contender_setting("graph_1cell_quadratic_savestates_splitcat") == ("graph_1cell", True)
    assert bench.contender_setting("graph_1cell_splitcat_savestates") == ("graph_1cell", False)
    assert bench.contender_setting("graph_Ncells_savestates") == ("graph_Ncells_savestates", False)  # refused later
    seen = []

    def run_cell(args, kind, d_state, seq_len):
        model = bench.build_model(args, d_state, "cpu")
        seen.append((args.quadratic_max_len, grad_slots._in_place, {m.save_chunk_states for m in model.mixers}))
        raise RuntimeError("recorded")

    monkeypatch.setattr(bench, "run_cell", run_cell)
    common = [*CELL_SMOKE, "--contenders"]
    bench.main(common + ["eager_1cell,eager_1cell_savestates,eager_1cell_quadratic_splitcat_savestates"])
    assert seen == [(0, True, {False}), (0, True, {True}), (32, False, {True})]
    seen.clear()
    bench.main(common + ["eager_1cell", "--save_chunk_states"])
    assert seen == [(0, True, {True})]
    with pytest.raises(SystemExit):
        bench.main(common + ["eager_Ncells_savestates"])


def test_train_throughput_setting_contenders_train_with_their_model_settings(monkeypatch, capsys):
    """lightning_graph_savestates, _recompute and _savestates_recompute are lightning_graph with the module's
    save_chunk_states, recompute_norm_output or both on; the others keep the defaults."""
    throughput = load_benchmark("train_throughput")
    seen = []

    def lightning_run(args, cfg, device, precision, cuda_graph=False, **model_settings):
        seen.append(model_settings)
        return 1.0

    monkeypatch.setattr(throughput, "lightning_run", lightning_run)
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", "--config", "cpu-small", "--device", "cpu",
                                      "--contenders", "lightning,lightning_graph_savestates,lightning_graph_recompute,"
                                      "lightning_graph_savestates_recompute"])
    throughput.main()
    assert seen == [{}, {"save_chunk_states": True}, {"recompute_norm_output": True},
                    {"save_chunk_states": True, "recompute_norm_output": True}]
    assert "lightning_graph_savestates_recompute:" in capsys.readouterr().out



def test_attention_form_kernel_check_catches_a_wrong_or_failing_contender():
    """benchmarks/attention_form_kernel.py's check: the torch form passes against itself in fp32; a form off by 1e-3
    relative in y or in grad x only, or one that raises, is a FAIL with its figure or error (no triton needed)."""
    import torch

    class GradOff(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, grad):
            return grad * 1.001

    bench = load_benchmark("attention_form_kernel")
    assert bench.check(bench.torch_form, 16, 8, "cpu") == (True, "ok (0.0e+00)")
    for wrong in (lambda **kw: bench.torch_form(**kw) * 1.001,
                  lambda x, **kw: bench.torch_form(GradOff.apply(x), **kw)):
        ok, text = bench.check(wrong, 16, 8, "cpu")
        assert not ok and text.startswith("FAIL (") and "Error" not in text
    ok, text = bench.check(lambda **kw: 1 / 0, 16, 8, "cpu")
    assert not ok and "ZeroDivisionError" in text
    with pytest.raises(SystemExit, match="d_state/LEN"):
        bench.parse_cell("64x64")
    with pytest.raises(SystemExit, match="LEN must be 1-1024"):
        bench.parse_cell("64/2048")
    assert bench.parse_cell("64/128") == (64, 128)  # the blocked kernels' rows


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="our attention form runs here only in Triton's "
                    "interpreter")
def test_attention_form_kernel_times_every_plan_and_puts_the_settings_back(capsys, monkeypatch):
    """A smoke run of one row: the torch form, ours, the blocked kernels and (--sweep) each plan of SWEEP are checked
    and timed, each with the warps and stages it was asked for; the kernels' module settings are as before
    afterwards."""
    from lightning_mamba.models.kernels import ssd_quadratic_triton as q

    bench = load_benchmark("attention_form_kernel")
    monkeypatch.setattr(bench, "SWEEP", [bench.Plan(4), bench.Plan(None, 1), bench.Plan(None, None, 16),
                                         bench.Plan(None, None, None, 128)])
    before = {k: getattr(q, k) for k in ("NUM_WARPS", "NUM_STAGES", "BLOCK_N", "MAXNREG", "KEEP_SCORES_FROM_N")}
    assert bench.main(["--device", "cpu", "--cells", "16/8", "--tokens", "8", "--dtype", "fp32", "--sweep"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("16/8 ")]
    assert [r[1] for r in rows] == ["torch", "ours", "blocked", "ours,", "ours,", "ours,", "ours,", "fastest:"]
    assert all(" ".join(r).count(" ok (") == 1 for r in rows[:-1])
    # (warps, stages, columns, registers, C B^T) as launched: the module's, then each plan's (its missing fields the
    # module's)
    warps, cols = str(q.num_warps(q.block_l(8))), str(q.BLOCK_N)  # rows of 8: a 16-time tile's warps (1)
    scores = "kept" if q.keep_scores(16, 16) else "made"
    assert warps == "1"
    assert [r[-12:-7] for r in (rows[1], *rows[3:7])] == [
        [warps, "-", cols, "-", scores], ["4", "-", cols, "-", scores], [warps, "1", cols, "-", scores],
        [warps, "-", "16", "-", scores], [warps, "-", cols, "128", scores]]
    assert {k: getattr(q, k) for k in before} == before
    # --sweep scores: C B^T made again in the backward, then kept from the forward, both checked; the setting put back
    assert bench.main(["--device", "cpu", "--cells", "16/8", "--tokens", "8", "--dtype", "fp32", "--sweep",
                       "scores"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("16/8 ")]
    assert [r[1] for r in rows] == ["torch", "ours", "blocked", "ours,", "ours,", "fastest:"]
    assert all(" ".join(r).count(" ok (") == 1 for r in rows[:-1])
    assert [r[-8] for r in rows[3:5]] == ["made", "kept"]
    assert {k: getattr(q, k) for k in before} == before


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the blocked kernels run here only in Triton's "
                    "interpreter")
def test_attention_form_kernel_times_the_blocked_kernels_warps_past_the_one_tile_rows(capsys, monkeypatch):
    """Rows longer than the one-tile kernels take (72 tokens: two 64-token blocks): only the torch form and the
    blocked kernels run, --sweep times the blocked kernels at each warp count of BLOCKED_SWEEP, each checked, and
    their module's warps are as before afterwards."""
    from lightning_mamba.models.kernels import ssd_blocked_triton as blocks

    bench = load_benchmark("attention_form_kernel")
    monkeypatch.setattr(bench, "BLOCKED_SWEEP", [bench.Plan(4)])
    before = blocks.NUM_WARPS
    assert bench.main(["--device", "cpu", "--cells", "16/72", "--tokens", "72", "--dtype", "fp32", "--sweep"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("16/72 ")]
    assert [r[1] for r in rows] == ["torch", "blocked", "blocked,", "fastest:"]
    assert all(" ".join(r).count(" ok (") == 1 for r in rows[:-1])
    assert [r[-12] for r in rows[1:3]] == [str(before), "4"]  # the warps each launched with
    assert rows[-1][-1] == "kernels" and blocks.NUM_WARPS == before


def test_figure_cost_times_the_training_process_with_and_without_the_drawing_process(capsys):
    """benchmarks/figure_cost.py: both contenders time every round, the in-process baseline named in the ratio; the
    drawing process keeps the training process busy for less time than drawing there."""
    bench = load_benchmark("figure_cost")
    assert bench.main(["--rounds", "2", "--positions", "16"]) == 0
    out = capsys.readouterr().out
    busy = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()
            if line.startswith(("in_process ", "drawing_process "))}
    assert set(busy) == {"in_process", "drawing_process"} and busy["drawing_process"] < busy["in_process"]
    assert "ratio in_process/drawing_process" in out


def test_sweep_speed_reads_a_study_folders_record_times_and_a_listing_alike(tmp_path, capsys):
    """Two cells evaluated every 500 steps: a at 100 steps/s from t=20.5, b at 50 steps/s from t=30 (its first record
    late, as a cell compiling beside others); a stopped by its budget at step 4,250. The first record and the stop's
    are left out; together they trained 150 steps/s over t=40..55.5, where both were past their first evaluation."""
    bench = load_benchmark("sweep_speed")
    times = {"state8_len32": [(20.5 + 5 * k, 500 * (k + 1)) for k in range(8)] + [(57.5, 4250)],
             "state16_len32": [(30 + 10 * k, 500 * (k + 1)) for k in range(5)]}
    lines = []
    for cell, rows in times.items():
        folder = tmp_path / "study" / "cells" / cell / "lengthgen"
        folder.mkdir(parents=True)
        for when, step in rows:
            path = folder / f"step_{step}.json"
            path.write_text("{}")
            os.utime(path, (1.8e9 + when, 1.8e9 + when))
            copied = tmp_path / "copied" / "cells" / cell / "lengthgen" / path.name  # a copy: new mtimes, written_at
            copied.parent.mkdir(parents=True, exist_ok=True)
            copied.write_text(json.dumps({"step": step, "written_at_ms": int((1.8e9 + when) * 1000)}))
            lines.append(f"{int(1.8e9 + when)} 00:00:{when % 60:05.2f} {path}")  # the form `stat -c '%Y %y'` gives
    listing = tmp_path / "times.txt"
    listing.write_text("# a header line\n" + "\n".join(lines) + "\n")
    for argv in ([str(tmp_path / "study")], ["--listing", str(listing)], [str(tmp_path / "copied")]):
        assert bench.main([*argv, "--tokens_per_step", "1000"]) == 0
        printed = capsys.readouterr().out
        assert re.search(r"state8_len32 +100\.0 steps/s +0\.10M tokens/s +\(3,000 steps in 30\.0 s\)", printed)
        assert re.search(r"state16_len32 +50\.0 steps/s +0\.05M tokens/s +\(1,500 steps in 30\.0 s\)", printed)
        assert re.search(r"2 cells at once +150\.0 steps/s +0\.15M tokens/s .*the 15\.5 s", printed)
    with pytest.raises(SystemExit, match="no cells/"):
        bench.main([str(tmp_path)])
    # one cell after the other (--processes 1): no span together; the baseline line compares their mean
    after = tmp_path / "after.txt"
    after.write_text("".join(f"{100 + 10 * k} cells/state{d}_len32/lengthgen/step_{500 * (k + 1)}.json\n"
                             for k in range(3) for d in (8,)) +
                     "".join(f"{200 + 5 * k} cells/state{d}_len32/lengthgen/step_{500 * (k + 1)}.json\n"
                             for k in range(3) for d in (16,)))
    assert bench.main(["--listing", str(after), "--baseline_listing", str(listing)]) == 0
    printed = capsys.readouterr().out
    assert "one after another" in printed and "cells at once" in printed  # the baseline's two ran together
    assert printed.strip().endswith("x baseline: 0.50")  # mean of 50 and 100 steps/s against 150 together


def test_first_evaluation_times_the_first_and_later_evaluations_of_a_process(capsys):
    bench = load_benchmark("first_evaluation")
    assert bench.main(["--device", "cpu", "--d_state", "16", "--length", "256", "--rows", "2", "--piece_len", "128",
                       "--d_model", "32", "--n_layer", "1", "--chunk_size", "32", "--profile", "5",
                       "--kernels", "4", "--variants", "chunk=16,tf32,chunk=16+bf16"]) == 0
    printed = capsys.readouterr().out
    first, later = re.search(r"first evaluation ([\d.]+) s; then ([\d.]+) s", printed).groups()
    assert float(first) > 0 and float(later) > 0 and "measure_forgetting" in printed
    assert "Self CPU time total" in printed  # the later call's operator table (device time on a GPU)
    chunk16, tf32, both = re.findall(r"variant (\S+): [\d.]+ s, x [\d.]+ the baseline's speed; largest change of "
                                     r"a position's loss ([\d.e+-]+)", printed)
    assert chunk16[0] == "chunk=16" and float(chunk16[1]) < 1e-4  # another chunk: the same losses to rounding
    assert tf32 == ("tf32", "0.00e+00")  # on a CPU no matmul takes TF32
    assert both[0] == "chunk=16+bf16" and float(both[1]) > 1e-4  # both settings taken: bf16 moves the losses
