"""Replicate seeds per (STATE, LEN): the grid, the per-cell seed of the fit, the checks, sharding, and the summary
(majority verdict, ties, unfinished seeds, T_forget per seed, results.csv's seed column, onset per seed). Without
seeds, names and outputs are those of a study of one run per cell."""

import csv
import json

import pytest

from lightning_mamba.commands import sweep as cmd
from lightning_mamba.study.onset import onset_summary
from lightning_mamba.study.summary import (
    CSV_FIELDS,
    majority_verdict,
    markdown_table,
    onset_lines,
    rows_of,
    summarize,
    summary_lines,
)
from lightning_mamba.study.sweep import (
    Study,
    SweepError,
    cell_args,
    make_cells,
    parse_cell_name,
    shard_cells,
    write_json,
)
from tests.study.test_onset import write_eval
from tests.study.test_sweep import fake_result


def fit_seed(study, cell):
    args = cell_args(study, cell)
    return int(args[args.index("--seed_everything") + 1])


# ---- the grid --------------------------------------------------------------------------------------------
def test_seed_cells_are_row_major_with_seeds_innermost_and_train_with_their_seed():
    study = Study(states=[16, 64], lens=[128, 256], seeds=[0, 7])
    study.validate()
    cells = make_cells(study)
    assert [c.name for c in cells] == [
        "state16_len128_seed0", "state16_len128_seed7", "state16_len256_seed0", "state16_len256_seed7",
        "state64_len128_seed0", "state64_len128_seed7", "state64_len256_seed0", "state64_len256_seed7"]
    assert [fit_seed(study, c) for c in cells] == [0, 7] * 4
    args = cell_args(study, cells[1])
    assert args[args.index("--trainer.logger.init_args.name") + 1] == "state16_len128_seed7"  # its own run folder
    assert [parse_cell_name(c.name) for c in cells[:2]] == [("state16", 128, 0), ("state16", 128, 7)]


def test_without_seeds_the_cells_are_named_and_seeded_as_before():
    study = Study(states=[16], lens=[128, 256], seed=3)
    assert [c.name for c in make_cells(study)] == ["state16_len128", "state16_len256"]
    assert [fit_seed(study, c) for c in make_cells(study)] == [3, 3]
    assert parse_cell_name("state16_len128") == ("state16", 128, None)
    assert parse_cell_name("L6_d512_len1024_seed2") == ("L6_d512", 1024, 2) and parse_cell_name("notes") is None


def test_shards_spread_seed_cells_like_any_others():
    cells = make_cells(Study(states=[16], lens=[32, 64], seeds=[0, 1, 2]))
    assert [c.name for c in shard_cells(cells, "0/4")] == ["state16_len32_seed0", "state16_len64_seed1"]
    assert sorted(c.name for i in range(4) for c in shard_cells(cells, f"{i}/4")) == sorted(c.name for c in cells)


@pytest.mark.parametrize("change, message", [
    ({"seeds": []}, "seeds must be a non-empty list of non-negative ints"),
    ({"seeds": [0, -1]}, "seeds must be a non-empty list of non-negative ints"),
    ({"seeds": [1.5]}, "seeds must be a non-empty list of non-negative ints"),
    ({"seeds": [0, 1, 0]}, r"seeds \[0, 1, 0\] repeat a seed"),
    ({"seeds": [0, 1], "seed": 5}, r"seed=5 and seeds=\[0, 1\] are both set: .*leave seed at 0"),
])
def test_bad_seeds_are_refused(change, message):
    with pytest.raises(SweepError, match=message):
        Study(**{"lens": [128, 256], **change}).validate()


def test_seeds_from_the_command_line(capsys):
    args = cmd.build_parser().parse_args(["--states", "[8]", "--lens", "[32]", "--seeds", "[0,1,2]"])
    assert cmd.study_from(args).seeds == [0, 1, 2]
    assert cmd.study_from(cmd.build_parser().parse_args([])).seeds is None
    assert cmd.main(["--states", "[8]", "--lens", "[32]", "--seeds", "[0,1,2]", "--dry_run", "true",
                     "--shard", "1/3"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("state8_len32_seed1: lightning-mamba fit ") and "--seed_everything 1 " in line
    assert cmd.main(["--seeds", "[0,1]", "--seed", "4", "--dry_run", "true"]) == 2
    assert "sweep: error: seed=4 and seeds=[0, 1] are both set" in capsys.readouterr().err


# ---- the summary -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("forgets, planned, verdict", [
    ([True], 1, True), ([False], 1, False), ([None], 1, None),  # one run: its verdict
    ([True, True, False], 3, True), ([False, False, True], 3, False),
    ([True, False], 2, None),  # a tie
    ([True, False, None], 3, None),  # an undetermined seed leaves no majority
    ([True, True], 3, True),  # two of three planned: decided, the third cannot change it
    ([True], 3, None), ([True, False], 3, None),  # too few finished to decide
])
def test_the_majority_of_the_planned_seeds_decides(forgets, planned, verdict):
    assert majority_verdict(forgets, planned) is verdict


LENS = [32, 64, 128]
# row -> seed -> forgets per LEN (False: fails); None: undetermined (a non-finite loss); absent: not finished
SEEDED = {
    "state16": {0: [False, True, True], 1: [False, False, True], 2: [False, True, True]},  # 64 by majority
    "state64": {0: [False, True, True], 1: [False, False, True], 2: [False, None, True]},  # 64: 1/1 + undetermined
    "state256": {0: [False, True, True], 1: [False, False, True]},  # seed 2 not finished: 64 undecided (missing)
}


def seeded_result(row, T, forgets, seed, n_s=1e6):
    r = fake_result(row, T, bool(forgets), n_s)
    r.update(cell=f"{row}_len{T}_seed{seed}", seed=seed)
    if forgets is None:
        r["verdict"].update(forgets=None, blowup_position=None)
    return r


def write_seeded_study(out, rows=SEEDED, seeds=(0, 1, 2)):
    (out / "cells").mkdir(parents=True)
    cells = [f"{row}_len{T}_seed{s}" for row in rows for T in LENS for s in seeds]
    write_json(str(out / "study.json"), {"lens": LENS, "seeds": list(seeds), "cells": cells})
    for n, (row, by_seed) in enumerate(rows.items()):
        for seed, verdicts in by_seed.items():
            for T, forgets in zip(LENS, verdicts):
                r = seeded_result(row, T, forgets, seed, n_s=(n + 1) * 1e6)
                (out / "cells" / r["cell"]).mkdir()
                write_json(str(out / "cells" / r["cell"] / "result.json"), r)


def test_the_summary_takes_each_lens_majority_and_gives_t_forget_per_seed(tmp_path):
    write_seeded_study(tmp_path)
    s = summarize(str(tmp_path), tensorboard=False)
    rows = {r["row"]: r for r in s["rows"]}
    a = rows["state16"]
    assert a["t_forget"] == 64 and a["status"] == "measured" and a["seeds"] == [0, 1, 2]
    assert a["passes"] == {"32": False, "64": True, "128": True}
    assert a["fails_per_len"]["64"] == {"fails": 1, "forgets": 2, "undetermined": 0, "finished": 3, "planned": 3}
    assert [(e["seed"], e["t_forget"]) for e in a["t_forget_per_seed"]] == [(0, 64), (1, 128), (2, 64)]
    assert len(a["blowup_over_len"]["32"]) == 3  # one per seed
    # one seed forgets, one fails, one is undetermined: no majority, the LEN is undetermined
    b = rows["state64"]
    assert b["t_forget"] is None and b["undetermined_lens"] == [64] and b["missing_lens"] == []
    assert b["t_forget_text"] == "incomplete (undetermined LEN 64)" and b["passes"]["64"] is None
    assert [e["t_forget_text"] for e in b["t_forget_per_seed"]] == ["64", "128", "incomplete"]
    # seed 2 has not finished: 1 of 2 forgets is no majority of 3 yet, the LEN is missing (not undetermined)
    c = rows["state256"]
    assert c["t_forget"] is None and c["missing_lens"] == [64] and c["undetermined_lens"] == []
    assert c["fails_per_len"]["64"] == {"fails": 1, "forgets": 1, "undetermined": 0, "finished": 2, "planned": 3}
    assert [e["t_forget_text"] for e in c["t_forget_per_seed"]] == ["64", "128", "incomplete"]
    # the fit has the majority's T_forget only: one point is no line
    assert s["fits"]["t_forget"]["paper_convention"]["n_points"] == 1
    assert any(n.startswith("seeds: a LEN forgets or fails when a strict majority") for n in s["notes"])
    assert len(s["cells_missing"]) == 3  # state256's seed 2


def test_the_table_reads_fails_k_of_n_per_len(tmp_path):
    write_seeded_study(tmp_path)
    lines = markdown_table(summarize(str(tmp_path), tensorboard=False)["rows"])
    assert lines[2] == ("| state16 | 1.000 | 0.900 | 64 (seed 0: 64, seed 1: 128, seed 2: 64) | "
                        "32: fails 3/3; 64: fails 1/3; 128: fails 0/3 |")
    assert lines[3].endswith("| 32: fails 3/3; 64: fails 1/3 (1 undetermined); 128: fails 0/3 |")
    assert lines[4].endswith("| 32: fails 2/2 (1 missing); 64: fails 1/2 (1 missing); 128: fails 0/2 (1 missing) |")
    for png in ("loss_curves", "t_forget_vs_state_size"):  # every seed's curve, every seed's T_forget
        assert (tmp_path / f"{png}.png").stat().st_size > 0


def test_a_tie_of_two_seeds_is_undetermined():
    results = [seeded_result("r", T, f, s) for s, verdicts in {0: [False, True], 1: [False, False]}.items()
               for T, f in zip([32, 64], verdicts)]
    (row,) = rows_of(results, None)  # no plan: the finished seeds are the planned ones
    assert row["passes"] == {"32": False, "64": None} and row["undetermined_lens"] == [64]
    assert row["t_forget"] is None and [e["t_forget_text"] for e in row["t_forget_per_seed"]] == ["64", "> 64"]


def test_results_csv_has_the_seed_of_every_cell(tmp_path):
    write_seeded_study(tmp_path)
    summarize(str(tmp_path), tensorboard=False)
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["cell"], r["seed"]) for r in table[:4]] == [
        ("state16_len32_seed0", "0"), ("state16_len32_seed1", "1"), ("state16_len32_seed2", "2"),
        ("state16_len64_seed0", "0")]  # row-major, seeds innermost


OLD_ROW_KEYS = ["row", "lens", "missing_lens", "undetermined_lens", "passes", "blowup_over_len", "t_forget",
                "t_forget_after", "t_forget_lower_bound", "t_forget_upper_bound", "forgets_below", "status", "d_state",
                "n_layer", "d_model", "n_s", "n_s_ssm_only", "params", "t_forget_text", "t_recall", "passkey_ran"]


def test_without_seeds_the_summary_keeps_its_structure(tmp_path):
    """No seed keys appear; results.csv gains one column, ``seed``: the seed the cell trained with (result.json
    records it for every cell), so the column means the same in every study."""
    (tmp_path / "cells").mkdir()
    write_json(str(tmp_path / "study.json"), {"cells": ["a_len32", "a_len64"], "seeds": None})
    for T, forgets in ((32, False), (64, True)):
        (tmp_path / "cells" / f"a_len{T}").mkdir()
        write_json(str(tmp_path / "cells" / f"a_len{T}" / "result.json"), {**fake_result("a", T, forgets, 1e6),
                                                                            "seed": 0})
    s = summarize(str(tmp_path), tensorboard=False)
    (row,) = s["rows"]
    assert list(row) == OLD_ROW_KEYS and row["blowup_over_len"] == {"32": 2.0, "64": None}
    assert row["t_forget"] == 64 and not any("seed" in n for n in s["notes"])
    assert "onset_by_seed" not in s["onset"] and set(s["onset"]["t_forget_by_step"]) <= {"a"}
    assert markdown_table(s["rows"])[-1] == "| a | 1.000 | 0.900 | 64 | 32:FAILS 64:forgets |"
    with open(tmp_path / "results.csv") as f:
        reader = csv.DictReader(f)
        table = list(reader)
    assert reader.fieldnames == list(CSV_FIELDS) and "seed" in CSV_FIELDS
    assert [f for f in CSV_FIELDS if f != "seed"] == [
        "cell", "row", "d_state", "n_layer", "d_model", "seq_len", "batch_size", "steps", "tokens", "params", "n_s",
        "n_s_ssm_only", "forgets", "blowup_position", "blowup_over_len", "max_in_window", "ratio_4_16x",
        "ratio_16_64x", "ratio_16_64x_lo", "ratio_16_64x_hi", "ratio_far", "ratio_far_lo", "ratio_far_hi",
        "evaluated_to", "val_loss", "t_recall", "train_seconds", "train_seconds_all_runs", "eval_seconds"]
    assert [r["seed"] for r in table] == ["0", "0"]


# ---- onset ----------------------------------------------------------------------------------------------
def test_onset_per_seed_and_t_forget_along_training_per_seed(tmp_path):
    # seed 0 of LEN 32 fails from step 200, seed 1 from 100, seed 2 never; LEN 64 forgets throughout
    fails_from = {0: 200, 1: 100, 2: None}
    cells = {}
    for seed, first in fails_from.items():
        for T in (32, 64):
            name = f"r_len{T}_seed{seed}"
            cells[name] = ("r", T)
            for step in (100, 200, 300):
                write_eval(str(tmp_path / name), step, T == 64 or first is None or step < first)
    onset = onset_summary(str(tmp_path), cells, 10)
    assert onset["cells"]["r_len32_seed1"]["seed"] == 1 and onset["cells"]["r_len32_seed1"]["row"] == "r"
    assert [(e["seed"], e["step"]) for e in onset["onset_by_seed"]["r_len32"]] == [(0, 200), (1, 100), (2, None)]
    assert [(e["seed"], e["step"]) for e in onset["onset_by_seed"]["r_len64"]] == [(0, None), (1, None), (2, None)]
    # T_forget along training of each seed on its own: seeds are not mixed at a step
    by_step = onset["t_forget_by_step"]
    assert set(by_step) == {"r_seed0", "r_seed1", "r_seed2"}
    assert [(e["step"], e["t_forget"], e["bound"]) for e in by_step["r_seed0"]] == [
        (100, None, "<= 32"), (200, 64, None), (300, 64, None)]
    lines = onset_lines(onset)
    assert "onset by seed, r_len32: seed 0 step 200, seed 1 step 100, seed 2 never (to step 300)" in lines


def test_a_seeded_study_summarizes_and_prints(tmp_path):
    write_seeded_study(tmp_path)
    for seed in (0, 1):
        write_eval(str(tmp_path / "cells" / f"state16_len32_seed{seed}"), 100, False)
    summarize(str(tmp_path), tensorboard=False)
    text = "\n".join(summary_lines(json.loads((tmp_path / "summary.json").read_text())))
    assert "| state16 |" in text and "64: fails 1/3" in text and "note: seeds: a LEN forgets" in text
    assert "onset by seed, state16_len32: seed 0 step 100, seed 1 step 100" in text
