"""Onset tracking: the first failing evaluation per cell and T_forget per row at each evaluation step, read from
the JSON files the forgetting observers write along training."""

import json
import math
import os

import pytest

from lightning_mamba.study.onset import cell_history, onset_of, onset_summary, t_forget_by_step


def write_eval(cell_folder, step: int, forgets: bool, log_retention=None, ratio: float = 1.0):
    os.makedirs(os.path.join(cell_folder, "lengthgen"), exist_ok=True)
    with open(os.path.join(cell_folder, "lengthgen", f"step_{step}.json"), "w") as f:
        json.dump({"step": step, "verdict": {"forgets": forgets, "blowup_position": None if forgets else 640,
                                             "evaluated_to": 4096},
                   "metrics": {"lengthgen/ratio_4_16x": ratio}}, f)
    if log_retention is not None:
        os.makedirs(os.path.join(cell_folder, "state_stats"), exist_ok=True)
        with open(os.path.join(cell_folder, "state_stats", f"step_{step}.json"), "w") as f:
            json.dump({"step": step, "text": {"summary": {"frac_heads_above_0.99": 0.25, "norm_growth": 3.0},
                                              "stats": {"log_retention_T": log_retention}}}, f)


def write_study(out, planned: list[str], cells: dict[str, list[float]]) -> None:
    """A study folder planning ``planned`` whose ``cells`` were evaluated every 500 steps with these ratios
    mean[16T,64T] / mean[T/2,T] (CI +-0.1; 2.5 and above fail the 2x test)."""
    os.makedirs(out / "cells")
    with open(out / "study.json", "w") as f:
        json.dump({"cells": planned, "tokens_per_batch": 16384}, f)
    for name, ratios in cells.items():
        for i, r in enumerate(ratios):
            write_eval(str(out / "cells" / name), 500 * (i + 1), r < 2.5)
            path = out / "cells" / name / "lengthgen" / f"step_{500 * (i + 1)}.json"
            entry = json.loads(path.read_text())
            entry["verdict"].update(ratio_16_64x=r, ratio_16_64x_lo=r - 0.1, ratio_16_64x_hi=r + 0.1)
            path.write_text(json.dumps(entry))


def test_the_first_failing_evaluation_is_the_onset(tmp_path):
    cell = str(tmp_path / "d_state256_len64")
    write_eval(cell, 500, True)
    write_eval(cell, 1000, True)
    write_eval(cell, 1500, False, log_retention=[[math.log(0.999), math.log(0.5)], [math.log(0.995), -30.0]],
               ratio=2.5)
    write_eval(cell, 2000, False)
    history = cell_history(cell, tokens_per_batch=16384)
    assert [h["step"] for h in history] == [500, 1000, 1500, 2000]  # numeric order, not text order
    assert history[2]["heads_alpha_T_above"] == 2 and history[2]["ratio_4_16x"] == 2.5
    assert history[2]["state_norm_growth"] == 3.0 and history[0]["heads_alpha_T_above"] is None
    onset = onset_of(history)
    assert onset == {"step": 1500, "tokens": 1500 * 16384, "evaluations": 4, "fails_at_end": True, "last_step": 2000}


def test_a_cell_that_always_forgets_has_no_onset(tmp_path):
    cell = str(tmp_path / "c")
    for step in (100, 200):
        write_eval(cell, step, True)
    assert onset_of(cell_history(cell))["step"] is None
    assert onset_of([])["step"] is None and onset_of([])["fails_at_end"] is False


def test_t_forget_is_named_at_each_step_all_lens_reached():
    # row r: at step 100 every LEN forgets (T_forget <= 32); at 200 LEN 32 fails, 64 forgets (T_forget 64);
    # at 300 all fail (> 128); step 400 lacks LEN 128 and is left out
    cells = {"r_len32": ("r", 32), "r_len64": ("r", 64), "r_len128": ("r", 128)}
    forgets = {"r_len32": [True, False, False, False], "r_len64": [True, True, False, False],
               "r_len128": [True, True, False]}
    histories = {c: [{"step": 100 * (i + 1), "forgets": f} for i, f in enumerate(v)] for c, v in forgets.items()}
    series = t_forget_by_step(histories, cells)["r"]
    assert [(e["step"], e["t_forget"], e["bound"]) for e in series] == [
        (100, None, "<= 32"), (200, 64, None), (300, None, "> 128")]


def test_t_forget_along_training_rests_on_the_longest_failing_len():
    """The summary's rule at each step: LEN 32 flat under a failing 64 does not decide (T_forget 128, not <= 32)."""
    cells = {"r_len32": ("r", 32), "r_len64": ("r", 64), "r_len128": ("r", 128)}
    histories = {c: [{"step": 100, "forgets": f}] for c, f in (("r_len32", True), ("r_len64", False),
                                                              ("r_len128", True))}
    assert [(e["step"], e["t_forget"], e["bound"]) for e in t_forget_by_step(histories, cells)["r"]] == [
        (100, 128, None)]


def test_the_summary_reads_every_planned_cell(tmp_path):
    cells_folder = tmp_path / "cells"
    write_eval(str(cells_folder / "s_len32"), 10, False)
    write_eval(str(cells_folder / "s_len64"), 10, True)
    out = onset_summary(str(cells_folder), {"s_len32": ("s", 32), "s_len64": ("s", 64), "s_len128": ("s", 128)}, 8)
    assert out["cells"]["s_len32"]["onset"]["step"] == 10 and out["cells"]["s_len128"]["history"] == []
    assert out["t_forget_by_step"]["s"] == []  # LEN 128 never evaluated: T_forget cannot be named


def test_the_summary_follows_started_cells_outside_the_plan_and_draws_the_onset(tmp_path):
    # a shard run with other --states/--lens wrote its cell into the same folder: the plan does not name it
    from lightning_mamba.study.summary import summarize
    from lightning_mamba.study.summary_plots import plot_onset

    out = tmp_path / "study"
    write_study(out, ["state64_len64"], {"state64_len64": [1.0, 1.4, 2.6], "state256_len64": [1.0, 1.1, 1.0]})
    summary = summarize(str(out))
    assert set(summary["onset"]["cells"]) == {"state64_len64", "state256_len64"}
    assert summary["onset"]["cells"]["state64_len64"]["onset"]["step"] == 1500
    assert (out / "onset.png").stat().st_size > 0
    # the grid map: per row and LEN, runs failing at the end / ever, the ratio at the end and at its peak
    assert summary["onset"]["grid"] == {
        "state64": {"64": {"runs": 1, "fail_at_end": 1, "failed_ever": 1, "ratio_end": 2.6, "ratio_peak": 2.6,
                           "steps_min": 1500, "steps_max": 1500}},
        "state256": {"64": {"runs": 1, "fail_at_end": 0, "failed_ever": 0, "ratio_end": 1.0, "ratio_peak": 1.1,
                            "steps_min": 1500, "steps_max": 1500}}}
    assert (out / "grid_map.png").stat().st_size > 0
    assert plot_onset({"cells": {"c": {"history": [{"step": 1, "forgets": True}]}}}) is None  # no ratio: no figure
    # the figures along training are in the study's TensorBoard run too, beside the T_forget figure (were PNGs only)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "summary")).Reload()
    assert {"study/onset", "study/grid_map", "study/t_forget_vs_state_size"} <= set(events.Tags()["images"])


def test_results_csv_carries_the_ratio_and_its_interval():
    from lightning_mamba.study.summary import CSV_FIELDS, csv_row

    verdict = {"forgets": False, "blowup_position": 200, "max_in_window": 1.7, "ratio_long_over_in": 1.4,
               "evaluated_to": 4096, "ratio_16_64x": 2.2, "ratio_16_64x_lo": 1.9, "ratio_16_64x_hi": 2.6}
    metrics = {"loss@1x": 1.7, "ratio_far": 3.1, "ratio_far_lo": 2.8, "ratio_far_hi": 3.5}
    row = csv_row({"cell": "state64_len64", "seq_len": 64, "verdict": verdict, "metrics": metrics})
    assert {"ratio_16_64x", "ratio_16_64x_lo", "ratio_16_64x_hi", "ratio_far", "ratio_far_lo",
            "ratio_far_hi"} <= set(CSV_FIELDS)
    assert (row["ratio_16_64x"], row["ratio_16_64x_lo"], row["ratio_16_64x_hi"]) == (2.2, 1.9, 2.6)
    assert (row["ratio_far"], row["ratio_far_lo"], row["ratio_far_hi"]) == (3.1, 2.8, 3.5)
    assert csv_row({"cell": "c_len64", "seq_len": 64, "verdict": verdict})["ratio_far"] is None  # an older result
    assert row["forgets"] == 0 and row["blowup_over_len"] == 200 / 64


def test_the_grid_map_counts_seeds_and_keeps_a_recovered_rise():
    from lightning_mamba.study.onset import grid_map
    from lightning_mamba.study.summary_plots import plot_grid_map

    def cell(ratios, fails):
        return {"row": "state1024", "seq_len": 64, "history": [
            {"step": 500 * (i + 1), "ratio_16_64x": r, "forgets": not f} for i, (r, f) in enumerate(zip(ratios, fails))]}

    grid = grid_map({"s0": cell([1.0, 1.3, 1.3], [False, True, True]),  # fails and stays failing
                     "s1": cell([1.0, 1.25, 0.9], [False, True, False]),  # failed once, then learned to forget
                     "s2": cell([1.0, 1.0, 1.0, 1.0], [False, False, False, False]),  # a longer run
                     "never": {"row": "state1024", "seq_len": 128, "history": []}})  # not evaluated: not in the map
    entry = grid["state1024"]["64"]
    assert (entry["runs"], entry["fail_at_end"], entry["failed_ever"]) == (3, 1, 2)
    assert entry["ratio_end"] == pytest.approx((1.3 + 0.9 + 1.0) / 3) and entry["ratio_peak"] == 1.3
    assert (entry["steps_min"], entry["steps_max"]) == (1500, 2000)  # unequal budgets show on the map
    assert "128" not in grid["state1024"]
    figure = plot_grid_map(grid)
    assert any(t.get_text().endswith("fail 1/2/3\n1.5-2.0K steps") for t in figure.axes[0].texts)
    assert plot_grid_map({}) is None


def test_the_grid_map_counts_a_miniature_runs_steps_as_steps():
    """A CPU run of a few dozen steps read '0.0K steps' on the map; under 1K steps the count is shown as it is."""
    from lightning_mamba.study.onset import grid_map
    from lightning_mamba.study.summary_plots import plot_grid_map

    def cell(steps):
        return {"row": "state8", "seq_len": 32, "history": [{"step": s, "ratio_16_64x": 1.0, "forgets": True}
                                                             for s in steps]}

    texts = [t.get_text() for t in plot_grid_map(grid_map({"a": cell([20, 40]), "b": cell([30, 60])})).axes[0].texts]
    assert any(t.endswith("\n40-60 steps") for t in texts), texts
    texts = [t.get_text() for t in plot_grid_map(grid_map({"a": cell([20, 40])})).axes[0].texts]
    assert any(t.endswith("\n40 steps") for t in texts), texts
