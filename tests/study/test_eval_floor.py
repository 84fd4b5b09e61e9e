"""Study.eval_min_tokens: a floor, in tokens, on how far every cell is evaluated, at the end and (through the cell's
LengthGeneralizationCallback min_length) along training."""

import csv
import json
import os

import pytest

from lightning_mamba.commands import sweep as cmd
from lightning_mamba.study.summary import summarize
from lightning_mamba.study.sweep import Study, SweepError, build_cli, make_cells

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "configs", "train.yaml")
MICRO = os.path.join(ROOT, "configs", "study", "forget_threshold_cpu.yaml")


def test_the_floor_sets_the_final_evaluation_length():
    study = Study(lens=[32, 512, 1024], eval_min_tokens=32768)  # eval_multiple 64
    assert [study.eval_length(t) for t in study.lens] == [32768, 32768, 65536]
    assert Study(lens=[32]).eval_length(32) == 2048
    assert Study(lens=[32], eval_tokens=1000, eval_min_tokens=2000).eval_length(32) == 2000


@pytest.mark.parametrize("value", [None, 1, 32768])
def test_a_positive_int_or_null_validates(value):
    Study(lens=[128, 256], eval_min_tokens=value).validate()


@pytest.mark.parametrize("value", [0, -1, 1.5, "32K", True])
def test_a_floor_that_is_not_a_positive_int_is_refused(value):
    with pytest.raises(SweepError, match="eval_min_tokens must be a positive number of tokens"):
        Study(lens=[128, 256], eval_min_tokens=value).validate()


def tiny_study(tmp_path, **kw) -> Study:
    return Study(states=[8], lens=[32], tokens_per_batch=256, tokens_per_cell=2048, out=str(tmp_path / "study"),
                 base_config=[TRAIN], model_overrides={"d_model": 32, "n_layer": 1, "headdim": 16, "backend": "torch"},
                 data_overrides={"tokenizer": "byte", "cache_dir": str(tmp_path / "cache")}, precision="32-true", **kw)


def lengthgen_of(cli):
    built = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "LengthGeneralizationCallback"]
    entries = [e for e in cli.config.trainer.callbacks if e.class_path.endswith("LengthGeneralizationCallback")]
    assert len(built) == len(entries) == 1  # configs/train.yaml has one
    return built[0], entries[0]


def test_the_floor_reaches_the_cells_callback_and_its_config(tmp_path):
    cli = build_cli(tiny_study(tmp_path, eval_min_tokens=4096), make_cells(tiny_study(tmp_path))[0])
    cb, entry = lengthgen_of(cli)
    assert cb.min_length == 4096 and cb.eval_length(32) == 4096
    assert entry.init_args.min_length == 4096 and "min_length: 4096" in cli.parser.dump(cli.config)  # config.yaml
    cb, entry = lengthgen_of(build_cli(tiny_study(tmp_path), make_cells(tiny_study(tmp_path))[0]))
    assert cb.min_length is None and entry.init_args.min_length is None  # null: the base config's (none here)


def test_a_floor_above_the_callbacks_cap_is_refused(tmp_path):
    capped = {"class_path": "lightning_mamba.callbacks.LengthGeneralizationCallback",
              "init_args": {"max_eval_tokens": 1024}}
    study = tiny_study(tmp_path, eval_min_tokens=4096, trainer_overrides={"callbacks": [capped]})
    with pytest.raises(SweepError, match="eval_min_tokens=4096 is above .* max_eval_tokens=1024"):
        build_cli(study, make_cells(study)[0])


def test_a_dry_run_says_the_floor_goes_to_the_cells_callback(capsys):
    assert cmd.main(["--config", MICRO, "--dry_run", "true", "--eval_min_tokens", "4096"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(line.endswith("# and LengthGeneralizationCallback min_length 4096 "
                                                 "(eval_min_tokens)") for line in lines)
    assert cmd.main(["--config", MICRO, "--dry_run", "true"]) == 0
    assert "min_length" not in capsys.readouterr().out


def test_a_cell_is_evaluated_to_the_floor_at_the_end_and_along_training(tmp_path, corpus, capsys):
    """One CPU cell (LEN 32; its base config's callback evaluates to 16 x 32 = 512, the study to 4 x 32 = 128):
    the floor of 600 tokens reaches result.json, results.csv and the callback's evaluations."""
    out = tmp_path / "study"
    data = {"tokenizer": "byte", "source": corpus, "cache_dir": str(tmp_path / "cache")}
    assert cmd.main(["--config", MICRO, "--base_config", json.dumps([TRAIN]), "--out", str(out), "--states", "[8]",
                     "--lens", "[32]", "--data_overrides", json.dumps(data), "--eval_min_tokens", "600",
                     "--tokens_per_cell", "1024"]) == 0  # 4 steps: one evaluation along training, at the end
    cell = out / "cells" / "state8_len32"
    r = json.loads((cell / "result.json").read_text())
    assert r["eval"]["length"] == r["verdict"]["evaluated_to"] == 600
    # ratio_far as the callback measures it: the last quarter of the 600 positions over (T/2, T], with its interval
    assert r["eval"]["far_window"] == [450, 600]
    far = {k: r["metrics"][k] for k in ("ratio_far", "ratio_far_lo", "ratio_far_hi")}
    assert far["ratio_far"] > 0 and far["ratio_far_lo"] <= far["ratio_far_hi"]
    assert "evaluated to 600" in capsys.readouterr().out
    along = [json.loads(p.read_text()) for p in sorted((cell / "lengthgen").glob("step_*.json"))]
    assert along and all(e["verdict"]["evaluated_to"] == 600 and e["far_window"] == [450, 600] for e in along)
    assert "min_length: 600" in (cell / "config.yaml").read_text()
    summarize(str(out), tensorboard=False)
    with open(out / "results.csv") as f:
        (row,) = csv.DictReader(f)
    assert row["evaluated_to"] == "600"
    assert {k: float(row[k]) for k in far} == pytest.approx(far)
    history = json.loads((out / "summary.json").read_text())["onset"]["cells"]["state8_len32"]["history"]
    assert history[-1]["evaluated_to"] == 600 and history[-1]["ratio_far"] > 0
