"""The sweep's CUDA MPS daemon (`--mps true`): started with pipe and log folders of its own before the shards, quit
and removed after them, refused with one line where it cannot work. `nvidia-cuda-mps-control` comes with the NVIDIA
driver, so on the CPU a stand-in program of the same name plays it: `-d` creates the control socket's path in
CUDA_MPS_PIPE_DIRECTORY, `quit` on stdin removes it; both are written to a record."""

import json
import os
import stat
import tempfile

import pytest

from lightning_mamba.commands import mps, sweep as cmd

from ..micro_study import micro_args

STAND_IN = """#!/bin/sh
if [ "$1" = "-d" ]; then
  [ -n "$MPS_FAIL" ] && { echo "$MPS_FAIL" >&2; exit 1; }
  touch "$CUDA_MPS_PIPE_DIRECTORY/control"
  echo "start $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY" >> "$MPS_RECORD"
else
  read line
  echo "$line $CUDA_MPS_PIPE_DIRECTORY" >> "$MPS_RECORD"
  rm -f "$CUDA_MPS_PIPE_DIRECTORY/control"
fi
"""


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / mps.CONTROL
    exe.write_text(STAND_IN)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    record = tmp_path / "record.txt"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MPS_RECORD", str(record))
    return record


def test_the_daemon_has_folders_of_its_own_and_is_quit_after(stand_in):
    lines = []
    with mps.private_daemon(lines.append) as env:
        pipe, log = env["CUDA_MPS_PIPE_DIRECTORY"], env["CUDA_MPS_LOG_DIRECTORY"]
        assert os.path.exists(mps.control_pipe(env)) and os.path.isdir(log)
        assert os.environ.get("CUDA_MPS_PIPE_DIRECTORY") != pipe  # only the shards get it, not this process
    assert stand_in.read_text().splitlines() == [f"start {pipe} {log}", f"quit {pipe}"]
    assert not os.path.exists(os.path.dirname(pipe))  # the temporary folder is gone
    assert lines and pipe in lines[0]


def test_a_daemon_that_cannot_start_is_one_line_and_leaves_nothing(stand_in, monkeypatch, tmp_path):
    monkeypatch.setenv("MPS_FAIL", "An instance of this daemon is already running")
    temp = tmp_path / "temp"  # where the daemon's folders are made
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with pytest.raises(mps.MPSError, match="already running.*drop --mps"):
        with mps.private_daemon():
            pass
    assert not stand_in.exists()  # never started, so never sent quit
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(mps.MPSError, match="not on PATH"):
        with mps.private_daemon():
            pass
    assert list(temp.iterdir()) == []


def test_shards_sharing_a_gpu_without_mps_get_a_note(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    note = mps.time_slicing_note(4, 1)
    assert note and "--mps true" in note and str(tmp_path / "control") in note
    assert mps.time_slicing_note(1, 1) is None  # one shard per GPU: nothing shares
    assert mps.time_slicing_note(2, 2) is None
    assert mps.time_slicing_note(4, 0) is None  # no GPU: the cells run on the CPU
    (tmp_path / "control").touch()  # a daemon's control socket: MPS is running
    assert mps.time_slicing_note(4, 1) is None


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_sweep_runs_its_shards_at_once_under_its_daemon_and_summarizes_them_all(tmp_path, corpus, capsys, stand_in,
                                                                                monkeypatch):
    """Also the check that --processes runs every shard and summarizes them all (tests/commands/
    test_sweep_command.py runs the same launch without the daemon only to see a shard fail)."""
    out = tmp_path / "study"
    args = micro_args(tmp_path, corpus, out, "--states", "[8]", "--processes", "2", "--mps", "true")
    assert cmd.main(args) == 2  # on a machine without a GPU: refused before anything runs
    assert "--mps true runs several shards at once on a CUDA GPU" in capsys.readouterr().err
    assert not stand_in.exists()
    # As on a one-GPU machine (the shards themselves train on the CPU): daemon up, both shards run and get
    # `--mps false` (they start no daemon of their own), daemon quit after them.
    monkeypatch.setattr(cmd, "_cuda_count", lambda: 1)
    assert cmd.main(args) == 0
    printed = capsys.readouterr().out
    assert "CUDA MPS daemon of this sweep started" in printed and "2 shards started" in printed
    assert [line.split()[0] for line in stand_in.read_text().splitlines()] == ["start", "quit"]
    assert "| state8 |" in printed
    for i, name in enumerate(["state8_len32", "state8_len64"]):  # cell k goes to shard k % 2
        assert json.loads((out / "cells" / name / "result.json").read_text())["cell"] == name
        assert f"sweep: {name}: training" in (out / "logs" / f"shard_{i}.log").read_text()
    assert json.loads((out / "summary.json").read_text())["cells_done"] == 2
