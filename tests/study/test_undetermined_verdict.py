"""A cell or an evaluation whose verdict is undetermined (forgets None: a non-finite loss, e.g. diverged weights) in
the study: no crash, never counted as failing, an empty results.csv field, missing for T_forget (with a note)."""

import csv
import json
from types import SimpleNamespace

from lightning_mamba.study import sweep
from lightning_mamba.study.onset import cell_history, onset_of, t_forget_by_step
from lightning_mamba.study.summary import csv_row, markdown_table, onset_lines, rows_of, summarize, summary_lines
from lightning_mamba.study.sweep import Study, make_cells, write_json
from tests.study.test_onset import write_eval
from tests.study.test_sweep import fake_result

REASON = ("the loss is not finite (nan in the bucket ending at position 96, 12 of 16 buckets): the weights are likely "
          "diverged; analyze an earlier checkpoint")


def undetermined_result(row, T, n_s):
    r = fake_result(row, T, True, n_s)
    r["verdict"].update(forgets=None, blowup_position=None, max_in_window=None, ratio_long_over_in=None,
                        undetermined=REASON)
    r["curve"]["loss"] = r["curve"]["loss"][:4] + [None] * 12  # NaN is written as null (sweep.clean)
    return r


def test_an_undetermined_cell_is_missing_for_t_forget_not_failing():
    """LEN 64 undetermined between a failing 32 and a forgetting 128: counting it as failing named T_forget 128."""
    results = [fake_result("a", 32, False, 1e6), undetermined_result("a", 64, 1e6), fake_result("a", 128, True, 1e6)]
    (row,) = rows_of(results, None)
    assert row["t_forget"] is None and row["status"] == "incomplete" and row["undetermined_lens"] == [64]
    assert row["t_forget_text"] == "incomplete (undetermined LEN 64)"
    assert row["passes"] == {"32": False, "64": None, "128": True}
    assert markdown_table([row])[-1].endswith("| 32:FAILS 64:undetermined 128:forgets |")
    # above the longest failing LEN it stops the reading too: 64 fails, 128 undetermined, 256 forgets
    results = [fake_result("b", 32, True, 1e6), fake_result("b", 64, False, 1e6), undetermined_result("b", 128, 1e6),
               fake_result("b", 256, True, 1e6)]
    (row,) = rows_of(results, None)
    assert row["t_forget"] is None and row["status"] == "incomplete" and row["forgets_below"] == [32]
    # under it, it does not count: 32 undetermined, 64 fails, 128 forgets
    results = [undetermined_result("c", 32, 1e6), fake_result("c", 64, False, 1e6), fake_result("c", 128, True, 1e6)]
    (row,) = rows_of(results, None)
    assert row["t_forget"] == 128 and row["t_forget_after"] == 64 and row["status"] == "measured"


def test_the_csv_field_of_an_undetermined_cell_is_empty_and_the_summary_says_why(tmp_path):
    (tmp_path / "cells").mkdir()
    write_json(str(tmp_path / "study.json"), {"cells": ["a_len32", "a_len64", "a_len128"]})
    for r in (fake_result("a", 32, False, 1e6), undetermined_result("a", 64, 1e6), fake_result("a", 128, True, 1e6)):
        (tmp_path / "cells" / r["cell"]).mkdir()
        write_json(str(tmp_path / "cells" / r["cell"] / "result.json"), r)
    assert csv_row(undetermined_result("a", 64, 1e6))["forgets"] is None  # was int(None): TypeError
    s = summarize(str(tmp_path), tensorboard=False)  # the curve grid draws the undetermined cell too
    with open(tmp_path / "results.csv") as f:
        table = {r["cell"]: r for r in csv.DictReader(f)}
    assert [table[c]["forgets"] for c in ("a_len32", "a_len64", "a_len128")] == ["0", "", "1"]
    assert s["rows"][0]["t_forget"] is None
    (note,) = [n for n in s["notes"] if "undetermined" in n]
    assert note.startswith("1 cell(s) have an undetermined verdict, counted as missing for T_forget: "
                           "a_len64: undetermined (the loss is not finite)")
    text = "\n".join(summary_lines(json.loads((tmp_path / "summary.json").read_text())))
    assert "note: 1 cell(s) have an undetermined verdict" in text and "incomplete (undetermined LEN 64)" in text
    assert (tmp_path / "loss_curves.png").stat().st_size > 0


def write_undetermined_eval(cell_folder, step):
    write_eval(cell_folder, step, True)
    path = f"{cell_folder}/lengthgen/step_{step}.json"
    with open(path) as f:
        entry = json.load(f)
    entry["verdict"].update(forgets=None, undetermined=REASON)
    with open(path, "w") as f:
        json.dump(entry, f)


def test_an_undetermined_evaluation_is_not_the_onset(tmp_path):
    cell = str(tmp_path / "a_len32")
    write_eval(cell, 100, True)
    write_undetermined_eval(cell, 200)
    history = cell_history(cell)
    assert history[1]["forgets"] is None and history[1]["undetermined"] == REASON
    assert onset_of(history)["step"] is None  # no evaluation failed
    write_eval(cell, 300, False)
    write_undetermined_eval(cell, 400)
    history = cell_history(cell)
    onset = onset_of(history)
    assert onset["step"] == 300 and onset["fails_at_end"] is False
    lines = onset_lines({"cells": {"a_len32": {"onset": onset, "history": history}}, "t_forget_by_step": {}})
    assert lines == ["onset: a_len32 fails first at step 300; undetermined at its last (step 400)",  # not "forgets again"
                     "onset: a_len32 is undetermined (the loss is not finite) at step(s) 200, 400: not counted as failing"]


def test_t_forget_along_training_leaves_out_a_step_with_an_undetermined_len():
    cells = {"r_len32": ("r", 32), "r_len64": ("r", 64)}
    histories = {"r_len32": [{"step": 100, "forgets": False}, {"step": 200, "forgets": False}],
                 "r_len64": [{"step": 100, "forgets": None}, {"step": 200, "forgets": True}]}
    assert [(e["step"], e["t_forget"]) for e in t_forget_by_step(histories, cells)["r"]] == [(200, 64)]


def test_the_sweep_log_says_undetermined(tmp_path, monkeypatch):
    study = Study(states=[16], lens=[64], tokens_per_batch=256, tokens_per_cell=512, out=str(tmp_path))
    (cell,) = make_cells(study)
    trainer = SimpleNamespace(world_size=1, global_step=2, is_global_zero=True, callback_metrics={}, callbacks=[],
                              fit=lambda *a, **kw: None, strategy=SimpleNamespace(barrier=lambda: None))
    cli = SimpleNamespace(trainer=trainer, model=SimpleNamespace(model=None),
                          datamodule=SimpleNamespace(hparams=SimpleNamespace(batch_size=4)))
    monkeypatch.setattr(sweep, "build_cli", lambda study, cell: cli)
    monkeypatch.setattr(sweep, "evaluate_cell", lambda *a, **kw: {**undetermined_result("state16", 64, 1e6),
                                                                    "eval": {"length": 64 * 16}})
    messages = []
    sweep.run_cell(study, cell, messages.append)
    (line,) = [m for m in messages if "written" in m]
    assert line.startswith(f"sweep: state16_len64: undetermined ({REASON}) (evaluated to 1024)"), line


def test_the_table_gives_a_miniature_models_state_size_in_thousands():
    """The CPU study's models (a few thousand state entries) read '0.016' in millions: the table takes the unit the
    plots take, thousands there, millions for the real study."""
    (row,) = rows_of([fake_result("a", 32, True, 16384)], None)
    table = markdown_table([row])
    assert table[0].startswith("| row | N_S (thousands) | N_S SSM-only (thousands) |")
    assert table[-1].startswith("| a | 16.384 | 14.745 |")
    (row,) = rows_of([fake_result("a", 32, True, 2.5e6)], None)
    assert markdown_table([row])[0].startswith("| row | N_S (millions) |")
