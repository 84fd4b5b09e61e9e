"""`lightning-mamba sweep --map_summaries`: one states x LEN map over the cells of several studies' summary.json."""

import json
import os

import numpy as np
import pytest

from lightning_mamba.commands.sweep import main
from lightning_mamba.study.summary import summarize
from lightning_mamba.study.t_forget import lens_deciding, t_forget_of

from .test_onset import write_study


def study_with(folder, cells: dict[str, list[float]]) -> str:
    """A study whose cells were evaluated along training with these ratios, summarized by the package; returns its
    summary.json."""
    write_study(folder, sorted(cells), cells)
    summarize(str(folder), tensorboard=False)
    return str(folder / "summary.json")


def test_one_map_over_two_slices(tmp_path, capsys):
    a = study_with(tmp_path / "a", {"state64_len64": [1.0, 2.6], "state256_len64": [1.0, 1.1, 1.0]})
    b = study_with(tmp_path / "b", {"state64_len64": [1.0, 1.2]})  # the same cell trained again: a second run
    out = tmp_path / "map"
    assert main(["--out", str(out), "--map_summaries", json.dumps([a, b])]) == 0
    assert "map of 3 evaluated run(s) from 2 summaries" in capsys.readouterr().out
    data = json.loads((out / "grid_map.json").read_text())
    assert data["runs"] == 3 and data["summaries"] == [os.path.normpath(a), os.path.normpath(b)]
    assert data["grid"]["state64"]["64"] == {"runs": 2, "fail_at_end": 1, "failed_ever": 1, "ratio_end": 1.9,
                                             "ratio_peak": 2.6, "steps_min": 1000, "steps_max": 1000}
    assert data["grid"]["state256"]["64"]["runs"] == 1
    assert (out / "grid_map.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".*.tmp"))  # written through temporary files, none left


@pytest.mark.parametrize("content, says", [(None, "cannot read"), ("not json", "not valid JSON"),
                                           ('{"rows": []}', "no evaluations along training")])
def test_what_is_not_a_summary_gets_one_line(tmp_path, capsys, content, says):
    path = tmp_path / "summary.json"
    if content is not None:
        path.write_text(content)
    assert main(["--out", str(tmp_path / "map"), "--map_summaries", json.dumps([str(path)])]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not (tmp_path / "map" / "grid_map.png").exists()


@pytest.mark.parametrize("forgets, expected", [
    ({32: False, 64: True, 128: True}, {"t_forget": 64, "t_forget_after": 32, "status": "measured"}),
    # a short budget left LEN 16 flat under a failing 64: the failure decides, 16 is named
    ({16: True, 64: False, 128: True}, {"t_forget": 128, "t_forget_after": 64, "forgets_below": [16]}),
    # flat at 64 between two failing LENs: the longer failure decides
    ({32: False, 64: True, 128: False, 256: True}, {"t_forget": 256, "t_forget_after": 128, "forgets_below": [64]}),
    ({32: False}, {"t_forget": None, "t_forget_lower_bound": 32, "status": "above_max_len"}),
    ({64: True, 32: True}, {"t_forget": None, "t_forget_upper_bound": 32, "status": "at_or_below_min_len"}),
    ({}, {"t_forget": None, "status": "incomplete"}),
])
def test_a_seeds_t_forget_rests_on_its_longest_failing_len(forgets, expected):
    got = t_forget_of(sorted(forgets), forgets)
    assert {k: got[k] for k in expected} == expected


@pytest.mark.parametrize("lens, verdicts, expected", [
    # a missing LEN under the longest failure does not matter (the old first-forgets rule called this incomplete)
    ([16, 32, 64], {32: False, 64: True}, {"t_forget": 64, "status": "measured"}),
    ([16, 32, 64], {16: False}, {"t_forget": None, "status": "incomplete"}),  # 32, just above, is missing
    ([16, 32, 64], {32: True}, {"t_forget": None, "status": "incomplete"}),  # no failure and 16 missing
    ([16, 32, 64], {16: True, 64: True}, {"t_forget_upper_bound": 16, "status": "at_or_below_min_len"}),
    ([16, 32, 64], {16: True, 32: False}, {"t_forget": None, "status": "incomplete", "forgets_below": [16]}),
])
def test_t_forget_with_missing_lens(lens, verdicts, expected):
    got = t_forget_of(lens, verdicts)
    assert {k: got[k] for k in expected} == expected


def test_the_lens_that_decide_are_the_longest_failure_and_the_next():
    assert lens_deciding([16, 32, 64, 128], {16: True, 32: False, 64: True, 128: True}) == [32, 64]
    assert lens_deciding([16, 32, 64], {16: False, 32: True, 64: False}) == [64]
    assert lens_deciding([16, 32, 64], {16: True}) == [16]


def summary_of(cells: dict[str, tuple[int, list[tuple[int, bool, int]]]], rows: dict[str, int]) -> dict:
    """A summary.json as the sweep writes it, reduced to what the map reads: ``cells`` name -> (seed or None,
    [(step, forgets, evaluated_to)]), ``rows`` row -> N_S."""
    out = {"rows": [{"row": r, "d_state": int(r[5:]), "n_s": n, "n_s_ssm_only": n} for r, n in rows.items()],
           "onset": {"cells": {}}}
    for name, (seed, evals) in cells.items():
        row, rest = name.split("_len")
        out["onset"]["cells"][name] = {"row": row, "seq_len": int(rest.split("_")[0]),
                                       **({} if seed is None else {"seed": seed}),
                                       "history": [{"step": s, "forgets": f, "evaluated_to": e, "ratio_16_64x": 1.0}
                                                   for s, f, e in evals]}
    return out


def test_t_forget_per_seed_over_slices_and_its_fit(tmp_path, capsys):
    far, near = 32768, 2048
    a = tmp_path / "a.json"
    a.write_text(json.dumps(summary_of({
        "state512_len32": (None, [(500, True, far), (1000, False, far)]),  # seed 0: fails at 32
        "state512_len64": (None, [(500, True, far)]),
        "state1024_len64_seed1": (1, [(500, False, far)]),
        "state2048_len32": (None, [(900, False, near)]),  # evaluated to 2K only: does not count
        "state2048_len64": (None, [(500, True, far)]),
    }, {"state512": 1_000_000, "state1024": 2_000_000, "state2048": 4_000_000})))
    b = tmp_path / "b.json"
    b.write_text(json.dumps(summary_of({
        "state1024_len64_seed1": (1, [(200, True, far)]),  # fewer steps than slice a's run: a's verdict stands
        "state1024_len128_seed1": (1, [(800, True, far)]),
        "state2048_len128_seed0": (0, [(700, False, far)]),
        "state2048_len256_seed0": (0, [(700, True, far)]),
    }, {"state1024": 2_000_000, "state2048": 4_000_000})))
    out = tmp_path / "map"
    assert main(["--out", str(out), "--map_summaries", json.dumps([str(a), str(b)])]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "grid_map.json").read_text())
    seeds = {(e["row"], e["seed"]): e for e in data["t_forget_per_seed"]}
    assert {k: e["t_forget"] for k, e in seeds.items()} == {("state512", 0): 64, ("state1024", 1): 128,
                                                             ("state2048", 0): 256}
    assert seeds[("state1024", 1)]["lens"]["64"]["step"] == 500 and seeds[("state2048", 0)]["forgets_below"] == [64]
    assert "32" not in seeds[("state2048", 0)]["lens"]  # the near evaluation was left out
    fit = data["fits"]["t_forget"]["paper_convention"]["fit"]
    slope, intercept = np.polyfit([1.0, 2.0, 4.0], [64 / 1024, 128 / 1024, 256 / 1024], 1)
    assert fit["a"] == pytest.approx(slope) and fit["b"] == pytest.approx(intercept, abs=1e-9)
    assert fit["r2"] == pytest.approx(1.0)
    assert "state1024 seed 1: T_forget 128" in printed and "3 points, R^2 1.000" in printed
    assert (out / "t_forget_per_seed.png").read_bytes()[:4] == b"\x89PNG"


def test_a_floor_no_evaluation_reaches_is_said_not_read_as_no_verdict(tmp_path, capsys):
    """Every evaluation under --map_min_evaluated_to (a study evaluated to 64 x LEN only): the command printed just
    "no fit: 0 finite point(s)", as if no run had a verdict; it names the floor and the furthest evaluation now."""
    path = tmp_path / "a.json"
    path.write_text(json.dumps(summary_of({"state64_len32": (None, [(500, False, 2048)]),
                                           "state64_len64": (None, [(500, True, 4096)])}, {"state64": 100_000})))
    out = tmp_path / "map"
    assert main(["--out", str(out), "--map_summaries", json.dumps([str(path)])]) == 0
    printed = capsys.readouterr().out
    assert ("T_forget seed by seed: no evaluation reached 32768 tokens (the furthest: 4096): give a lower "
            "--map_min_evaluated_to to read these runs' verdicts") in printed
    assert main(["--out", str(out), "--map_summaries", json.dumps([str(path)]), "--map_min_evaluated_to", "2048"]) == 0
    printed = capsys.readouterr().out
    assert "no evaluation reached" not in printed and "state64 seed 0: T_forget 64" in printed


def test_summaries_not_evaluated_to_64x_get_one_line(tmp_path, capsys):
    """Evaluations that stopped short of 64 x LEN (a CPU study's) have no ratio mean[16T,64T] / mean[T/2,T] to draw."""
    path = study_with(tmp_path / "a", {"state64_len64": [1.0, 2.6]})
    summary = json.loads(open(path).read())
    for cell in summary["onset"]["cells"].values():
        for h in cell["history"]:
            h.pop("ratio_16_64x", None)
    open(path, "w").write(json.dumps(summary))
    assert main(["--out", str(tmp_path / "map"), "--map_summaries", json.dumps([path])]) != 0
    assert capsys.readouterr().err.strip().splitlines() == [
        "sweep: error: the 1 summaries hold no cell evaluated to 64 x LEN (the map draws the ratio mean[16T,64T] / "
        "mean[T/2,T]): give summaries of studies with eval_multiple 64"]
