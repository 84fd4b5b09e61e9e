"""Provisional verdicts: a planned cell stopped early (no result.json, e.g. under a time budget) is judged by its last
evaluation along training (cells/<cell>/lengthgen/step_N.json); the summary uses it for T_forget and the fits, and
says so in rows[].provisional, the T_forget text, the table, the fit entry and line, and the notes. A final result
wins over a provisional one."""

import json

from lightning_mamba.study.summary import markdown_table, rows_of, summarize, summary_lines
from lightning_mamba.study.sweep import write_json
from tests.study.test_onset import write_eval
from tests.study.test_seeds import write_seeded_study
from tests.study.test_sweep import fake_result, write_study
from tests.study.test_undetermined_verdict import write_undetermined_eval

STEPS = 20000  # the plan's tokens_per_cell // tokens_per_batch
PLAN = {"lens": [32, 64, 128], "tokens_per_cell": STEPS * 256, "tokens_per_batch": 256, "eval_multiple": 64,
        "eval_tokens": None, "eval_min_tokens": None}
# the model of a cell, as its run's config.yaml records it: N_S = 2 x (128 x 16 + (128 + 2 x 16) x 3) = 5056
CONFIG = "model:\n  d_model: 64\n  n_layer: 2\n  d_state: 16\n  headdim: 16\nother: 1\n"


def plan_study(out, cells):
    (out / "cells").mkdir(parents=True)
    write_json(str(out / "study.json"), {**PLAN, "cells": cells})


def write_result(out, r):
    (out / "cells" / r["cell"]).mkdir(parents=True, exist_ok=True)
    write_json(str(out / "cells" / r["cell"] / "result.json"), r)


def test_cells_stopped_early_give_a_provisional_t_forget_from_their_last_evaluation(tmp_path):
    plan_study(tmp_path, [f"{row}_len{T}" for row in ("a", "b") for T in (32, 64, 128)])
    # row a: LEN 32 finished (fails); LEN 64 stopped at step 10,501 (forgets there); LEN 128 never started
    write_result(tmp_path, fake_result("a", 32, False, 1e6))
    write_eval(str(tmp_path / "cells" / "a_len64"), 5000, False)
    write_eval(str(tmp_path / "cells" / "a_len64"), 10501, True)  # the last evaluation decides
    # row b: nothing finished; LEN 32 forgot at step 5000 and fails at its last, 7,101; LEN 64 forgets at 10,501
    write_eval(str(tmp_path / "cells" / "b_len32"), 5000, True)
    write_eval(str(tmp_path / "cells" / "b_len32"), 7101, False)
    write_eval(str(tmp_path / "cells" / "b_len64"), 10501, True)
    (tmp_path / "cells" / "b_len32" / "config.yaml").write_text(CONFIG)
    s = summarize(str(tmp_path), tensorboard=False)
    a, b = s["rows"]
    assert a["t_forget"] == 64 and a["status"] == "measured" and a["missing_lens"] == [128]
    assert a["passes"] == {"32": False, "64": True}
    assert a["provisional"] == {"64": {"cell": "a_len64", "step": 10501, "planned_steps": STEPS, "evaluated_to": 4096}}
    assert a["t_forget_provisional"] is True
    assert a["t_forget_text"] == "64 (provisional: LEN 64 at step 10,501 of 20,000)"
    assert b["t_forget"] == 64 and b["passes"] == {"32": False, "64": True} and set(b["provisional"]) == {"32", "64"}
    assert b["t_forget_text"] == "64 (provisional: LEN 32 at step 7,101, LEN 64 at step 10,501 of 20,000)"
    assert (b["n_s"], b["n_s_ssm_only"], b["d_state"]) == (5056, 4096, 16)  # placed by its config.yaml
    assert s["cells_done"] == 1 and s["cells_missing"] == ["a_len64", "a_len128", "b_len32", "b_len64", "b_len128"]
    assert s["cells_provisional"]["b_len32"] == {"row": "b", "seq_len": 32, "forgets": False, "step": 7101,
                                                 "planned_steps": STEPS, "evaluated_to": 4096,
                                                 "final_eval_length": 2048}
    assert "5 planned cell(s) have no result yet: a_len64, a_len128, b_len32, b_len64, b_len128" in s["notes"]
    (note,) = [n for n in s["notes"] if "provisional" in n]
    assert note == ("3 of them gave a provisional verdict, from their last evaluation along training (used for "
                    "T_forget until their result.json is written): a_len64: forgets at step 10,501 of 20,000; "
                    "b_len32: FAILS at step 7,101 of 20,000; b_len64: forgets at step 10,501 of 20,000")
    table = markdown_table(s["rows"])
    assert table[2] == ("| a | 1.000 | 0.900 | 64 (provisional: LEN 64 at step 10,501 of 20,000) | "
                        "32:FAILS 64:forgets (provisional, step 10,501) |")
    assert table[3].endswith("| 32:FAILS (provisional, step 7,101) 64:forgets (provisional, step 10,501) |")
    text = "\n".join(summary_lines(json.loads((tmp_path / "summary.json").read_text())))
    assert "64 (provisional: LEN 32 at step 7,101, LEN 64 at step 10,501 of 20,000)" in text
    assert "note: 3 of them gave a provisional verdict" in text
    assert (tmp_path / "t_forget_vs_state_size.png").stat().st_size > 0


def test_a_final_result_wins_over_the_provisional_verdict(tmp_path):
    plan_study(tmp_path, ["a_len32", "a_len64"])
    write_result(tmp_path, fake_result("a", 32, False, 1e6))
    write_eval(str(tmp_path / "cells" / "a_len64"), 300, False)  # along training it failed...
    s = summarize(str(tmp_path), tensorboard=False)
    (row,) = s["rows"]
    assert row["passes"]["64"] is False and row["t_forget_text"] == "> 64 (provisional: LEN 64 at step 300 of 20,000)"
    write_result(tmp_path, fake_result("a", 64, True, 1e6))  # ...and its final evaluation forgets
    s = summarize(str(tmp_path), tensorboard=False)
    (row,) = s["rows"]
    assert row["passes"] == {"32": False, "64": True} and row["t_forget"] == 64 and row["t_forget_text"] == "64"
    assert "provisional" not in row and "t_forget_provisional" not in row and "cells_provisional" not in s
    assert not any("provisional" in n for n in s["notes"])
    # in rows_of too: a provisional verdict of a cell with a result is not used
    early = {**fake_result("a", 64, False, 1e6), "provisional": {"step": 300, "planned_steps": None,
                                                                  "evaluated_to": 4096, "final_eval_length": None}}
    (row,) = rows_of([fake_result("a", 32, False, 1e6), fake_result("a", 64, True, 1e6)], None, [early])
    assert row["passes"]["64"] is True and "provisional" not in row


def test_an_undetermined_last_evaluation_stays_undetermined(tmp_path):
    plan_study(tmp_path, ["a_len32", "a_len64"])
    write_result(tmp_path, fake_result("a", 32, False, 1e6))
    write_eval(str(tmp_path / "cells" / "a_len64"), 100, True)
    write_undetermined_eval(str(tmp_path / "cells" / "a_len64"), 200)
    (row,) = summarize(str(tmp_path), tensorboard=False)["rows"]
    assert row["t_forget"] is None and row["undetermined_lens"] == [64] and row["passes"]["64"] is None
    assert row["t_forget_text"] == "incomplete (undetermined LEN 64; provisional: LEN 64 at step 200 of 20,000)"


def test_a_fit_with_a_provisional_t_forget_is_labelled(tmp_path):
    write_study(tmp_path, skip={"state64_len4096"})  # state64's first forgetting LEN has no result.json
    s = summarize(str(tmp_path), tensorboard=False)
    fit = s["fits"]["t_forget"]["paper_convention"]
    assert fit["n_points"] == 2 and "provisional" not in fit  # state64 is incomplete: not a point
    write_eval(str(tmp_path / "cells" / "state64_len4096"), 300, True)  # it forgets at its last evaluation
    s = summarize(str(tmp_path), tensorboard=False)
    rows = {r["row"]: r for r in s["rows"]}
    assert rows["state64"]["t_forget"] == 4096 and rows["state64"]["t_forget_text"] == (
        "4096 (provisional: LEN 4096 at step 300)")  # the plan does not say how many steps
    for convention in ("paper_convention", "ssm_only"):
        fit = s["fits"]["t_forget"][convention]
        assert fit["n_points"] == 3 and fit["provisional"] is True and fit["provisional_rows"] == ["state64"]
    assert "provisional" not in rows["state16"] and "provisional" not in s["fits"]["t_forget"]["lower_bounds"][0]
    (line,) = [x for x in summary_lines(s) if x.startswith("T_forget = a N_S + b")]
    assert "over 3 points, provisional: T_forget of state64 from evaluations along training" in line


def test_a_seed_stopped_early_votes_with_its_last_evaluation(tmp_path):
    write_seeded_study(tmp_path)  # state256's seed 2 has no result: LEN 64 is 1 of 2, undecided
    for T, forgets in ((32, False), (64, True)):
        write_eval(str(tmp_path / "cells" / f"state256_len{T}_seed2"), 300, forgets)
    s = summarize(str(tmp_path), tensorboard=False)
    c = {r["row"]: r for r in s["rows"]}["state256"]
    assert c["t_forget"] == 64 and c["missing_lens"] == [] and c["t_forget_provisional"] is True
    assert c["fails_per_len"]["64"] == {"fails": 1, "forgets": 2, "undetermined": 0, "finished": 2, "planned": 3,
                                        "provisional": 1}
    assert c["provisional"]["64"] == [{"cell": "state256_len64_seed2", "seed": 2, "step": 300, "planned_steps": None,
                                       "evaluated_to": 4096}]
    assert c["t_forget_text"] == "64 (provisional: LEN 32 seed 2 at step 300, LEN 64 seed 2 at step 300)"
    assert [e["t_forget_text"] for e in c["t_forget_per_seed"]] == [
        "64", "128", "64 (provisional: LEN 32 seed 2 at step 300, LEN 64 seed 2 at step 300)"]
    assert markdown_table(s["rows"])[4].endswith(
        "| 32: fails 3/3 (1 provisional); 64: fails 1/3 (1 provisional); 128: fails 0/2 (1 missing) |")
    # the other rows keep their keys
    assert "provisional" not in {r["row"]: r for r in s["rows"]}["state16"]
