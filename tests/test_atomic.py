"""Result files (verdicts, curves, passkey and state JSON) are written whole or not at all."""

import csv
import json
import os

import pytest

from lightning_mamba.analysis.evaluator import write_position_losses_csv
from lightning_mamba.atomic import atomic_write_json


def test_json_is_replaced_whole_and_a_failed_write_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "verdict.json")
    atomic_write_json(path, {"forgets": True}, indent=2)
    atomic_write_json(path, {"forgets": False, "ratio": 1.5})
    assert json.loads(open(path).read()) == {"forgets": False, "ratio": 1.5}
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})  # not serialisable: nothing is written
    assert json.loads(open(path).read()) == {"forgets": False, "ratio": 1.5}
    assert os.listdir(tmp_path) == ["verdict.json"]


def test_position_losses_csv(tmp_path):
    path = str(tmp_path / "curve.csv")
    write_position_losses_csv(path, [2.5, 1.0 / 3.0])
    with open(path, newline="") as f:
        assert list(csv.reader(f)) == [["position", "loss"], ["1", "2.5"], ["2", "0.333333"]]
