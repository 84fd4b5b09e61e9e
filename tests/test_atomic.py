"""Result files (verdicts, curves, passkey and state JSON) are written whole or not at all."""

import csv
import json
import os

import pytest

from lightning_mamba.analysis.evaluator import write_position_losses_csv
from lightning_mamba.atomic import atomic_write_json, round_floats


def test_json_is_replaced_whole_and_a_failed_write_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "verdict.json")
    atomic_write_json(path, {"forgets": True}, indent=2)
    atomic_write_json(path, {"forgets": False, "ratio": 1.5})
    assert json.loads(open(path).read()) == {"forgets": False, "ratio": 1.5}
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})  # not serialisable: nothing is written
    assert json.loads(open(path).read()) == {"forgets": False, "ratio": 1.5}
    assert os.listdir(tmp_path) == ["verdict.json"]


def test_floats_can_be_written_short(tmp_path):
    obj = {"curve": [1 / 3, 2.0, float("nan")], "rows": 32, "nested": {"r": (2 / 3, 123456.789)}, "ok": True}
    path = str(tmp_path / "step_1.json")
    atomic_write_json(path, obj, float_digits=6)
    text = open(path).read()
    assert "0.333333," in text and "0.333333333" not in text and "NaN" in text
    assert json.loads(text)["nested"] == {"r": [0.666667, 123457.0]} and json.loads(text)["rows"] == 32
    assert round_floats(obj, 3)["curve"][:2] == [0.333, 2.0] and round_floats(obj, 3)["ok"] is True
    atomic_write_json(path, obj)  # by default every digit stays
    assert json.loads(open(path).read())["curve"][0] == 1 / 3


def test_position_losses_csv(tmp_path):
    path = str(tmp_path / "curve.csv")
    write_position_losses_csv(path, [2.5, 1.0 / 3.0])
    with open(path, newline="") as f:
        assert list(csv.reader(f)) == [["position", "loss"], ["1", "2.5"], ["2", "0.333333"]]
