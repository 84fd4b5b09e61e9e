"""Merging study folders (slices of one grid trained on different machines) into one summary: `lightning-mamba sweep
--merge '[a, b]' --out all` copies the cells without their checkpoints, plans the union, and summarizes them as if
they had been one folder; folders of other settings, a cell in two places, or the output among the sources are
refused with one line."""

import json
from dataclasses import asdict

import pytest

from lightning_mamba.commands.sweep import main as sweep_main
from lightning_mamba.study.merge import MUST_AGREE, merge_studies
from lightning_mamba.study.summary import summarize
from lightning_mamba.study.sweep import Study, SweepError, write_json
from tests.study.test_sweep import ROWS, write_study

SETTINGS = {"data_overrides": {"source": "code", "tokenizer": "byte"}, "model_overrides": {"a_lr_mult": 10.0},
            "eval_min_tokens": 32768, "tokens_per_batch": 16384}


def write_slice(folder, rows, **changed):
    """A study folder of `rows` (tests.study.test_sweep's fake cells), its plan with SETTINGS (or `changed`)."""
    write_study(folder, rows)
    plan = json.loads((folder / "study.json").read_text())
    settings = asdict(Study(**{**SETTINGS, **changed}))
    plan.update({k: settings[k] for k in MUST_AGREE}, trainer_overrides={"max_time": str(folder)})  # may differ
    write_json(str(folder / "study.json"), plan)


def halves(tmp_path):
    first, second = dict(list(ROWS.items())[:2]), dict(list(ROWS.items())[2:])
    write_slice(tmp_path / "a", first)
    write_slice(tmp_path / "b", second)
    (tmp_path / "a" / "cells" / "state16_len512" / "checkpoints").mkdir()
    (tmp_path / "a" / "cells" / "state16_len512" / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    return [str(tmp_path / "a"), str(tmp_path / "b")]


def test_merged_slices_summarize_like_one_folder(tmp_path):
    sources = halves(tmp_path)
    whole = tmp_path / "whole"
    write_slice(whole, ROWS)
    out = tmp_path / "all"
    merged = merge_studies(Study(**SETTINGS, out=str(out)), sources, log=lambda _: None)
    assert len(merged) == 4 * 5 and sorted(p.name for p in (out / "cells").iterdir()) == sorted(merged)
    assert (out / "cells" / "state16_len512" / "checkpoints").is_dir()
    assert not (out / "cells" / "state16_len512" / "checkpoints" / "last.ckpt").exists()  # weights left out
    assert not list(out.glob("cells/*.merging"))
    plan = json.loads((out / "study.json").read_text())
    assert plan["merged_from"] == sources and plan["cells"] == json.loads((whole / "study.json").read_text())["cells"]
    assert plan["data_overrides"] == SETTINGS["data_overrides"]
    got, want = summarize(str(out), tensorboard=False), summarize(str(whole), tensorboard=False)
    assert [(r["row"], r["t_forget"], r["passes"]) for r in got["rows"]] == [
        (r["row"], r["t_forget"], r["passes"]) for r in want["rows"]]
    assert got["fits"]["t_forget"] == want["fits"]["t_forget"] and got["fits"]["t_forget"]["paper_convention"]["fit"]


def test_the_command_merges_and_prints_the_summary(tmp_path, capsys):
    sources = halves(tmp_path)
    out = tmp_path / "all"
    argv = ["--out", str(out), "--merge", json.dumps(sources), "--tensorboard", "false",
            *[a for k, v in SETTINGS.items() for a in (f"--{k}", json.dumps(v))]]
    assert sweep_main(argv) == 0
    printed = capsys.readouterr().out
    assert "merged 10 cell(s) from" in printed and "| state128 |" in printed
    assert "ours a = 5, b = 1, R^2 = 1.0000 over 3 points" in printed  # the law over both slices' rows
    assert (out / "summary.json").exists()
    # again into the same folder: its cells are there already
    assert sweep_main(argv) == 2
    err = capsys.readouterr().err
    assert "is already in" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["other data", "twice", "out among sources", "not a study"])
def test_what_cannot_be_merged_is_refused_before_anything_is_copied(tmp_path, case):
    sources = halves(tmp_path)
    out = tmp_path / "all"
    if case == "other data":
        plan = json.loads((tmp_path / "b" / "study.json").read_text())
        write_json(str(tmp_path / "b" / "study.json"), {**plan, "data_overrides": {"source": "default"}})
        why = "data_overrides is"
    elif case == "twice":
        sources.append(sources[0])
        why = "is in both"
    elif case == "out among sources":
        out = tmp_path / "b"
        why = "the output folder"
    else:
        (tmp_path / "b" / "study.json").unlink()
        why = "has no study.json"
    with pytest.raises(SweepError, match=why):
        merge_studies(Study(**SETTINGS, out=str(out)), sources)
    assert case == "out among sources" or not out.exists()


def test_rows_come_by_state_size_whatever_order_the_slices_were_merged_in(tmp_path):
    """The summary's rows (table, loss curves) went in the order the merged folders were given (a later slice of
    small states came last); a states axis is now read by state size, as one folder's grid is."""
    later_small, earlier_large = halves(tmp_path)
    out = tmp_path / "all"
    merge_studies(Study(**SETTINGS, out=str(out)), [earlier_large, later_small], log=lambda _: None)
    rows = [r["row"] for r in summarize(str(out), tensorboard=False)["rows"]]
    assert rows == sorted(rows, key=lambda name: int(name.removeprefix("state"))) and len(rows) == len(ROWS), rows
