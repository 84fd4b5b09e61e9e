"""`lightning-mamba sweep --map_summaries`: one states x LEN map over the cells of several studies' summary.json."""

import json
import os

import pytest

from lightning_mamba.commands.sweep import main
from lightning_mamba.study.summary import summarize

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
