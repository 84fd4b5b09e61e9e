"""The study's machinery without training: cells, shards, per-cell CLI arguments, checks, and the summary built
from result.json files (T_forget, lower bounds, incomplete rows, fits, figures)."""

import csv
import json
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch

from lightning_mamba.study import sweep
from lightning_mamba.study.summary import summarize, summary_lines
from lightning_mamba.study.sweep import (
    Study,
    SweepError,
    cell_args,
    check_device,
    make_cells,
    record_plan,
    run_study,
    shard_cells,
    shard_of,
    write_json,
)


def test_cells_are_the_grid_row_major_with_stable_names():
    cells = make_cells(Study(states=[16, 64], lens=[128, 256, 512]))
    assert [c.name for c in cells] == ["state16_len128", "state16_len256", "state16_len512",
                                       "state64_len128", "state64_len256", "state64_len512"]
    assert dict(cells[3].model) == {"d_state": 64}


def test_the_papers_axis_varies_models_instead_of_states():
    study = Study(models=[{"name": "L6_d512", "n_layer": 6, "d_model": 512}, {"n_layer": 12, "d_model": 768}],
                  lens=[1024, 2048], model_overrides={"d_state": 128})
    study.validate()  # d_state in model_overrides is fine on this axis
    cells = make_cells(study)
    assert [c.name for c in cells] == ["L6_d512_len1024", "L6_d512_len2048", "d_model768_n_layer12_len1024",
                                       "d_model768_n_layer12_len2048"]
    args = cell_args(study, cells[0])
    assert args[args.index("--model.n_layer") + 1] == "6" and args[args.index("--model.d_state") + 1] == "128"
    assert "--model.name" not in args


def test_slices_run_as_separate_invocations_add_up_in_the_plan(tmp_path):
    """Two slices of one grid in one folder (--states '[512]' --lens '[64]', then --states '[1024]' ...): study.json
    plans both, so the summary sees the union and not the last slice alone."""
    out = str(tmp_path)
    for states, lens in (([512], [32, 64]), ([1024], [64]), ([512], [64])):
        study = Study(states=states, lens=lens, out=out)
        record_plan(study, make_cells(study))
    plan = json.load(open(tmp_path / "study.json"))
    assert plan["cells"] == ["state512_len32", "state512_len64", "state1024_len64"]
    assert plan["states"] == [512, 1024] and plan["lens"] == [32, 64]
    (tmp_path / "study.json").write_text("{not json")  # a damaged plan is replaced, not a crash
    record_plan(Study(states=[16], lens=[32], out=out), make_cells(Study(states=[16], lens=[32])))
    assert json.load(open(tmp_path / "study.json"))["cells"] == ["state16_len32"]


def test_a_sweep_with_other_settings_on_an_existing_folder_is_refused(tmp_path, monkeypatch):
    """Run again on a study's folder with another threshold (or corpus, model, evaluation...), every done cell was
    skipped and summarized as if judged with the new setting, and study.json took the new settings over. Refused in
    one line, before anything is written; the grid's axes, budgets, shard and the speed-only model settings may
    differ."""
    def train(*args, **kwargs):
        raise AssertionError("a cell started training")

    monkeypatch.setattr(sweep, "run_cell", train)
    out = str(tmp_path)
    first = Study(states=[8], lens=[32], tokens_per_batch=256, out=out, model_overrides={"d_model": 32})
    record_plan(first, make_cells(first))
    before = (tmp_path / "study.json").read_text()
    for change, key in (({"threshold": 1.5}, "threshold"), ({"eval_multiple": 16}, "eval_multiple"),
                        ({"model_overrides": {"d_model": 64}}, "model_overrides"),
                        ({"data_overrides": {"source": "code"}}, "data_overrides")):
        with pytest.raises(SweepError, match=f"holds a study with {key} .* not .*: its cells were trained and judged"):
            run_study(Study(**{**asdict(first), **change}))
        assert (tmp_path / "study.json").read_text() == before
    same = {"states": [16], "lens": [32, 64], "time_per_cell": "00:00:10:00", "tokens_per_cell": 512,
            "model_overrides": {"d_model": 32, "chunk_size": 16}, "shard": "0/2"}
    record_plan(Study(**{**asdict(first), **same}), make_cells(Study(**{**asdict(first), **same})))
    assert json.load(open(tmp_path / "study.json"))["states"] == [8, 16]


def test_shards_partition_the_grid():
    cells = make_cells(Study(states=[16, 32, 64, 128], lens=[128, 256, 512, 1024, 2048]))
    shards = [shard_cells(cells, f"{i}/4") for i in range(4)]
    assert sorted(c.name for s in shards for c in s) == sorted(c.name for c in cells)
    assert [len(s) for s in shards] == [5, 5, 5, 5]
    assert shard_of(" 3 / 8 ") == (3, 8)
    for bad in ("4/4", "1", "a/b", "0/0"):
        with pytest.raises(SweepError, match="shard"):
            shard_of(bad)


def test_cell_args_give_every_cell_the_same_tokens_per_step():
    study = Study(lens=[128, 2048], tokens_per_batch=65536, tokens_per_cell=2**25, out="o",
                  model_overrides={"d_model": 256}, data_overrides={"tokenizer": "byte"},
                  trainer_overrides={"val_check_interval": 128, "callbacks+": [{"class_path": "x.Y"}]})
    for cell in make_cells(study):
        args = cell_args(study, cell)
        value = {a: b for a, b in zip(args, args[1:]) if a.startswith("--")}
        assert int(value["--data.batch_size"]) * cell.seq_len == 65536
        assert value["--trainer.max_steps"] == "512" and value["--data.seq_len"] == str(cell.seq_len)
        assert value["--trainer.logger.init_args.save_dir"] == os.path.join("o", "cells")
        assert value["--trainer.logger.init_args.name"] == cell.name
        assert value["--trainer.callbacks+"] == '[{"class_path": "x.Y"}]' and value["--data.tokenizer"] == "byte"
    two = cell_args(study, make_cells(study)[0], world_size=2)
    assert two[two.index("--data.batch_size") + 1] == "256"  # 512 samples of 128 split over 2 devices
    assert "--trainer.max_time" not in two
    timed = Study(lens=[128], time_per_cell="00:01:30:00", trainer_overrides={"enable_progress_bar": False})
    budget = cell_args(timed, make_cells(timed)[0])  # beside the other trainer overrides, not instead of them
    assert budget[budget.index("--trainer.max_time") + 1] == "00:01:30:00" and "--trainer.enable_progress_bar" in budget


@pytest.mark.parametrize("change, message", [
    ({"tokens_per_batch": 1000}, "multiple of every LEN"),
    ({"tokens_per_cell": 10}, "less than one step"),
    # was a ZeroDivisionError traceback (steps = tokens_per_cell // tokens_per_batch), and -256 read "less than one step"
    ({"tokens_per_batch": 0}, "tokens_per_batch must be a positive number of tokens per optimizer step, e.g. 256"),
    ({"tokens_per_batch": -256}, "tokens_per_batch must be a positive number"),
    ({"data_overrides": {"seq_len": 64}}, "data_overrides.seq_len"),
    ({"trainer_overrides": {"max_steps": 5}}, "trainer_overrides.max_steps"),
    ({"model_overrides": {"d_state": 8}}, "conflicts with states"),
    ({"bucket": 4096}, "bucket"),
    # the criterion would refuse these after training: no judged bucket within LEN
    ({"bucket": 128}, "half the training length, 64 .* within 128 \\(the smallest LEN\\)"),
    ({"bucket": 65}, "half the training length, 64 \\(got 65\\)"),
    ({"eval_multiple": 1}, "must go past LEN"),
    ({"models": [{"n_layer": 2}, {"n_layer": 2}]}, "share a name"),
    # was the states axis, silently: a typo'd row list trained the default grid
    ({"models": []}, "models is an empty list"),
    ({"time_per_cell": "1h"}, "time_per_cell must be DD:HH:MM:SS"),
    # every cell skipped its passkey grid after training, and the summary said passkey had not run
    ({"passkey": True, "passkey_multiples": []}, "passkey_multiples must be a non-empty list of positive multiples"),
    ({"passkey": True, "passkey_multiples": [1, -2]}, "passkey_multiples must be a non-empty list"),
    ({"time_per_cell": "00:01:00:00", "trainer_overrides": {"max_time": "00:02:00:00"}}, "keep one"),
])
def test_settings_that_cannot_work_are_refused(change, message):
    with pytest.raises(SweepError, match=message):
        Study(**{"lens": [128, 256], **change}).validate()


def test_an_evaluation_device_that_cannot_work_is_refused_before_training(tmp_path, monkeypatch):
    """The device is first used by the final evaluation: a typo (gpu) or a GPU the machine lacks was a traceback
    after the first cell had trained."""
    def train(*args, **kwargs):
        raise AssertionError("a cell started training")

    monkeypatch.setattr(sweep, "run_cell", train)
    with pytest.raises(SweepError, match="device='gpu' is not a torch device"):
        run_study(Study(lens=[128], device="gpu", out=str(tmp_path / "a")))
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(SweepError, match=f"device='{missing}': this machine has"):
        run_study(Study(lens=[128], device=missing, out=str(tmp_path / "b")))
    assert not list(tmp_path.iterdir())  # refused before anything was written
    Study(lens=[128], device="gpu").validate()  # a summary (--summarize_only, --merge) does not use it
    check_device("cpu")


# ---- the summary from result.json files ------------------------------------------------------------------
def fake_result(row, T, forgets, n_s, blowup=None, t_recall=None):
    positions = np.arange(1, 17) * (T // 8)
    loss = np.full(16, 3.0) if forgets else np.linspace(3.0, 9.0, 16)
    r = {"cell": f"{row}_len{T}", "row": row, "seq_len": T, "d_state": 16, "n_layer": 4, "d_model": 256,
         "n_s": n_s, "n_s_ssm_only": int(n_s * 0.9), "params": 1000, "steps": 8, "tokens": 2048, "batch_size": 4,
         "verdict": {"forgets": forgets, "blowup_position": None if forgets else (blowup or 2 * T),
                     "max_in_window": 3.0, "ratio_long_over_in": 1.0, "threshold": 2.0, "bucket": T // 8,
                     "seq_len": T, "evaluated_to": 16 * T},
         "curve": {"positions": positions.tolist(), "loss": loss.tolist()}, "val_loss": float("nan")}
    if t_recall is not None:
        r["passkey"] = {"lengths": [T, 2 * T], "depths": [0.25, 0.75], "accuracy": [[1.0, 0.0], [1.0, 0.5]],
                        "t_recall": t_recall}
    return r


LENS = [512, 1024, 2048, 4096, 8192]  # the shortest passes nowhere: T_forget is measured
ROWS = {  # row -> (N_S, first passing LEN or None); T_forget = 5 N_S(M) + 1 (K tokens) for the measured rows
    "state16": (0.0e6, 1024), "state32": (0.2e6, 2048), "state64": (0.6e6, 4096), "state128": (1.2e6, None)}


def write_study(out, rows=ROWS, skip=(), passkey=False):
    os.makedirs(out / "cells", exist_ok=True)
    plan = {"states": [16, 32, 64, 128], "lens": LENS, "models": None,
            "cells": [f"{r}_len{T}" for r in rows for T in LENS]}
    write_json(str(out / "study.json"), plan)
    for i, (row, (n_s, first)) in enumerate(rows.items()):
        for T in LENS:
            if f"{row}_len{T}" in skip:
                continue
            recall = int(2 ** (i + 10)) if passkey else None
            (out / "cells" / f"{row}_len{T}").mkdir()
            write_json(str(out / "cells" / f"{row}_len{T}" / "result.json"),
                       fake_result(row, T, first is not None and T >= first, n_s, t_recall=recall))


def test_summary_t_forget_lower_bounds_and_the_linear_fit(tmp_path):
    write_study(tmp_path, passkey=True)
    s = summarize(str(tmp_path))
    rows = {r["row"]: r for r in s["rows"]}
    assert [r["row"] for r in s["rows"]] == list(ROWS)  # plan order
    assert rows["state16"]["t_forget"] == 1024 and rows["state64"]["t_forget"] == 4096
    assert rows["state64"]["passes"] == {"512": False, "1024": False, "2048": False, "4096": True, "8192": True}
    assert rows["state128"]["t_forget"] is None and rows["state128"]["t_forget_text"] == "> 8192"
    fit = s["fits"]["t_forget"]["paper_convention"]
    assert fit["n_points"] == 3  # the lower bound is left out
    assert fit["fit"]["a"] == pytest.approx(5.0) and fit["fit"]["b"] == pytest.approx(1.0)
    assert fit["paper"] == {"a": 5.172, "b": -4.469}
    assert s["fits"]["t_forget"]["lower_bounds"] == [{"row": "state128", "n_s": 1.2e6, "t_forget_above": 8192}]
    assert s["fits"]["t_recall"]["paper_convention"]["n_points"] == 4  # T_recall: best cell of each row
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 20 and table[0]["cell"] == "state16_len512" and table[0]["val_loss"] == ""
    for png in ("t_forget_vs_state_size", "loss_curves", "passkey_heatmaps"):
        assert (tmp_path / f"{png}.png").stat().st_size > 0
    assert len(list((tmp_path / "summary").glob("events.out.tfevents.*"))) == 1
    text = "\n".join(summary_lines(json.loads((tmp_path / "summary.json").read_text())))
    assert "paper: a = 5.172, b = -4.469" in text and "| state128 |" in text and "> 8192" in text


def test_a_second_summary_replaces_the_first_in_tensorboard_too(tmp_path):
    """Split from the 4-row summary test above onto a one-row study: a second summary of that one redrew its
    figures (~7 s)."""
    write_study(tmp_path, rows={"state16": (0.1e6, 1024)})
    for _ in range(2):
        summarize(str(tmp_path))
        assert len(list((tmp_path / "summary").glob("events.out.tfevents.*"))) == 1


def test_missing_cells_make_a_row_incomplete_not_guessed(tmp_path):
    write_study(tmp_path, skip={"state32_len1024", "state64_len8192"})
    s = summarize(str(tmp_path))
    rows = {r["row"]: r for r in s["rows"]}
    assert rows["state32"]["t_forget"] is None and rows["state32"]["status"] == "incomplete"
    assert rows["state64"]["t_forget"] == 4096  # a missing *longer* LEN does not hide a measured T_forget
    assert s["cells_missing"] == ["state32_len1024", "state64_len8192"] and s["notes"]


def test_fewer_than_two_points_is_no_fit_not_a_crash(tmp_path):
    write_study(tmp_path, rows={"state16": (0.1e6, 1024), "state32": (0.2e6, None)})
    s = summarize(str(tmp_path))
    fit = s["fits"]["t_forget"]["paper_convention"]
    assert fit["fit"] is None and "no fit" in fit["reason"]
    assert s["fits"]["t_recall"]["fit"] is None and "passkey did not run" in s["fits"]["t_recall"]["reason"]
    assert any("no fit" in line for line in summary_lines(s))


def test_the_summary_records_the_study_folder_as_given(tmp_path, monkeypatch):
    """A relative --out stays relative in summary.json (no path of the machine it ran on)."""
    write_study(tmp_path / "study", rows={"state16": (0.1e6, 1024)})
    monkeypatch.chdir(tmp_path)
    s = summarize("study/")
    assert s["out"] == "study" and json.load(open("study/summary.json"))["out"] == "study"


def test_a_failure_above_a_forgetting_len_decides_and_the_flat_one_is_named(tmp_path):
    """T_forget rests on the longest LEN that fails: LENs that forget under it (a budget too short to fail) are
    named in forgets_below; with no longer LEN run, T_forget is only bounded from below."""
    write_study(tmp_path, rows={"state16": (0.1e6, 1024)})  # LEN 512 fails, 1024-8192 forget
    path = tmp_path / "cells" / "state16_len4096" / "result.json"
    write_json(str(path), fake_result("state16", 4096, False, 0.1e6))
    s = summarize(str(tmp_path), tensorboard=False)
    row = s["rows"][0]
    assert (row["t_forget"], row["t_forget_after"], row["forgets_below"]) == (8192, 4096, [1024, 2048])
    write_json(str(tmp_path / "cells" / "state16_len8192" / "result.json"), fake_result("state16", 8192, False, 0.1e6))
    row = summarize(str(tmp_path), tensorboard=False)["rows"][0]
    assert row["t_forget"] is None and row["t_forget_lower_bound"] == 8192 and row["status"] == "above_max_len"
    assert row["forgets_below"] == [1024, 2048] and row["t_forget_text"] == "> 8192"
    assert not (tmp_path / "summary").exists()


# ---- a cell on several devices (DDP per cell: trainer_overrides devices/strategy) --------------------------
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_cell_args_split_the_global_batch_over_the_devices(world_size):
    study = Study(states=[16], lens=[64, 128, 256], tokens_per_batch=4096, tokens_per_cell=2**16)
    for cell in make_cells(study):
        args = cell_args(study, cell, world_size=world_size)
        per_device = int(args[args.index("--data.batch_size") + 1])
        assert per_device * world_size * cell.seq_len == 4096  # the tokens per optimizer step do not change
        assert args[args.index("--trainer.max_steps") + 1] == "16"


def test_a_batch_that_does_not_split_over_the_devices_is_refused():
    study = Study(states=[16], lens=[64, 256], tokens_per_batch=512)
    short, long = make_cells(study)
    args = cell_args(study, short, world_size=8)
    assert args[args.index("--data.batch_size") + 1] == "1"  # 8 samples of 64: one per device
    with pytest.raises(SweepError, match="a batch of 2 samples does not split over 8 devices.*multiple of 2048"):
        cell_args(study, long, world_size=8)


def test_a_cell_on_several_devices_is_built_with_its_batch_split(tmp_path):
    from lightning_mamba.study.sweep import build_cli

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    study = Study(states=[8], lens=[32, 64], tokens_per_batch=256, tokens_per_cell=2048, out=str(tmp_path),
                  base_config=[os.path.join(root, "configs", "train.yaml")],
                  model_overrides={"d_model": 32, "n_layer": 1, "headdim": 16, "backend": "torch"},
                  data_overrides={"tokenizer": "byte", "cache_dir": str(tmp_path / "cache")},
                  trainer_overrides={"accelerator": "cpu", "devices": 2, "strategy": "ddp"}, precision="32-true")
    for cell in make_cells(study):
        cli = build_cli(study, cell)  # the Trainer is built, not launched: no processes start here
        assert cli.trainer.world_size == 2 and type(cli.trainer.strategy).__name__ == "DDPStrategy"
        assert cli.datamodule.hparams.batch_size * 2 * cell.seq_len == 256
        assert cli.trainer.max_steps == 8


def test_a_row_passing_at_the_shortest_len_is_an_upper_bound_not_a_measurement():
    from lightning_mamba.study.summary import fits_of, rows_of

    def result(row, n_s, t, forgets):
        return {"cell": f"{row}_len{t}", "row": row, "seq_len": t, "d_state": 16, "n_layer": 4, "d_model": 256,
                "n_s": n_s, "n_s_ssm_only": n_s, "params": 1, "verdict": {"forgets": forgets, "blowup_position": None}}

    results = [result("state16", 1e5, 128, True), result("state16", 1e5, 256, True),
               result("state64", 4e5, 128, False), result("state64", 4e5, 256, True)]
    rows = {r["row"]: r for r in rows_of(results, None)}
    assert rows["state16"]["t_forget"] is None and rows["state16"]["t_forget_text"] == "<= 128"
    assert rows["state16"]["status"] == "at_or_below_min_len"
    assert rows["state64"]["t_forget"] == 256 and rows["state64"]["status"] == "measured"
    fits = fits_of(list(rows.values()))
    assert fits["t_forget"]["upper_bounds"] == [{"row": "state16", "n_s": 1e5, "t_forget_at_most": 128}]
    assert fits["t_forget"]["paper_convention"]["n_points"] == 1  # the upper bound stays out of the fit


def test_the_summary_says_why_passkey_did_not_run():
    """A study with passkey on whose every passkey length was shorter than the template said "study.passkey: false"."""
    from lightning_mamba.study.summary import fits_of, rows_of

    skipped = {**fake_result("state16", 512, True, 1e5), "passkey": None}  # sweep.passkey_cell's record of a skip
    reason = fits_of(rows_of([skipped], None), passkey_planned=True)["t_recall"]["reason"]
    assert "shorter than the passkey template; raise passkey_multiples" in reason
    unfinished = fits_of(rows_of([fake_result("state16", 512, True, 1e5)], None), passkey_planned=True)
    assert "did not run yet" in unfinished["t_recall"]["reason"]
    off = fits_of(rows_of([fake_result("state16", 512, True, 1e5)], None))
    assert "study.passkey: false" in off["t_recall"]["reason"]


def test_a_built_cell_keeps_the_noise_filters(tmp_path):
    """torch's LeafSpec deprecation warning (raised by Lightning's code) is off in a cell's run as in `fit` (a
    catch_warnings around the cell's build once restored the filters and a warning filtered so printed into every
    cell's log)."""
    import warnings

    from lightning_mamba.study.sweep import build_cli

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    study = Study(states=[8], lens=[32], tokens_per_batch=256, tokens_per_cell=2048, out=str(tmp_path),
                  base_config=[os.path.join(root, "configs", "train.yaml")],
                  model_overrides={"d_model": 32, "n_layer": 1, "headdim": 16, "backend": "torch"},
                  data_overrides={"tokenizer": "byte", "cache_dir": str(tmp_path / "cache")},
                  trainer_overrides={"accelerator": "cpu", "logger": False}, precision="32-true")
    with warnings.catch_warnings(record=True) as seen:  # an outer scope: what build_cli leaves behind
        warnings.simplefilter("always")
        build_cli(study, make_cells(study)[0])
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `treespec.is_leaf()` instead.",
                      FutureWarning, stacklevel=1)
        warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen if "LeafSpec" in str(w.message)] == []
    assert any("an unrelated warning" in str(w.message) for w in seen)


def test_a_cell_another_sweep_is_training_is_skipped_not_trained_twice(tmp_path, monkeypatch):
    """Two sweeps started on one --out both trained every cell into the same run directory (twice the work, two
    TensorBoard runs in one folder, each process resuming from the other's checkpoints). A cell whose lock another
    process holds is skipped; once it is released (the process ended, even by kill -9) the cell is taken."""
    class Built(Exception):
        pass

    def build(*args, **kwargs):
        raise Built

    monkeypatch.setattr(sweep, "build_cli", build)
    study = Study(states=[8], lens=[32], out=str(tmp_path))
    cell = make_cells(study)[0]
    lines = []
    with sweep.claim_cell(study, cell) as held:  # another process, as far as flock goes (its own open file)
        assert held == sweep.cell_lock_path(study, cell)
        assert sweep.run_cell(study, cell, lines.append) is None
    assert "another sweep is training it in this folder" in lines[-1] and "skipped" in lines[-1]
    with pytest.raises(Built):  # released: this process trains it
        sweep.run_cell(study, cell, lines.append)
    (tmp_path / "cells" / cell.name).mkdir(parents=True)
    write_json(str(tmp_path / "cells" / cell.name / "result.json"), {"cell": cell.name})
    with sweep.claim_cell(study, cell):  # finished by the other process meanwhile: done, whoever holds the lock
        assert sweep.run_cell(study, cell, lines.append) == {"cell": cell.name}


def test_the_summary_removes_what_killed_writes_left_behind(tmp_path):
    """A sweep killed (kill -9) while the summary or a cell wrote a file leaves atomic_write's temporary file beside
    it (.<name>.<pid>.<random>.tmp); nothing removed those, run after run. The summary removes the ones whose writer
    is gone and that have not been touched for a while, and leaves a live writer's."""
    import subprocess
    import sys
    import time

    from lightning_mamba.data.cache import STALE_TEMPORARY_SECONDS

    write_study(tmp_path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    cell = tmp_path / "cells" / "state16_len512"
    (cell / "lengthgen").mkdir()
    stale = [tmp_path / f".summary.json.{gone}.0123abcd.tmp", cell / f".along_training.png.{gone}.deadbeef.tmp",
             cell / f".result.json.{gone}.00ff00ff.tmp", cell / "lengthgen" / f".step_8.json.{gone}.12345678.tmp"]
    kept = [tmp_path / f".results.csv.{os.getpid()}.0123abcd.tmp",  # its writer is alive
            tmp_path / f".loss_curves.png.{gone}.0123abcd.tmp"]  # too recent: maybe another machine's live writer
    old = time.time() - STALE_TEMPORARY_SECONDS - 10
    for path in stale + kept:
        path.write_bytes(b"half a file")
        if path != kept[1]:
            os.utime(path, (old, old))
    summarize(str(tmp_path), tensorboard=False)
    assert [p.name for p in stale if p.exists()] == [] and all(p.exists() for p in kept)


@pytest.mark.parametrize("row,message", [({"name": "b", "bogus": 1}, "bogus"),
                                         ({"name": "b", "d_model": 64, "headdim": 7}, "headdim=7 must divide")])
def test_a_bad_row_of_models_is_refused_before_any_cell_trains(tmp_path, monkeypatch, capsys, row, message):
    """Every row's cell arguments are parsed and its model's settings checked up front: a bad second row of
    ``models`` was refused only when its turn came, after the first row's cells had trained."""
    trained = []
    monkeypatch.setattr(sweep, "run_cell", lambda study, cell, log=print: trained.append(cell.name))
    study = Study(models=[{"name": "a", "n_layer": 1, "d_model": 64}, row], lens=[64], out=str(tmp_path / "out"),
                  model_overrides={"d_state": 16})
    with pytest.raises((SystemExit, Exception)) as refused:
        run_study(study)
    assert trained == [] and not os.path.exists(study.out)
    err = capsys.readouterr().err
    if isinstance(refused.value, SystemExit):  # the CLI parser's line (and its hint where the options are)
        assert refused.value.code == 2 and message in err.splitlines()[0], err
    else:
        from lightning_mamba.cli import user_error

        assert message in str(refused.value) and user_error(refused.value) is not None  # the CLI prints one line
    study.models = study.models[:1]
    run_study(study)
    assert trained == ["a_len64"]
