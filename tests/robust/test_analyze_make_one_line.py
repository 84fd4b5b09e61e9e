"""analyze and make train on bad input: one line that says what to change, and no verdict made of NaN losses."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch

from lightning_mamba.analysis.criterion import judge_forgetting
from lightning_mamba.cli import main

from .conftest import run_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def done(tmp_path_factory, corpus, cache_dir):
    """A finished 2-step run's folder."""
    folder = tmp_path_factory.mktemp("done")
    main(["fit", "--config", run_config(folder, corpus, cache_dir, 2)])
    return folder


# ---- analyze --------------------------------------------------------------------------------------------------
def command_error(capsys, argv: list[str]) -> str:
    assert main_code(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def main_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_analyze_on_cuda_without_cuda(done, capsys):
    line = command_error(capsys, ["analyze", "--ckpt", str(done / "ckpt" / "last.ckpt"), "--device", "cuda"])
    assert line == ("analyze: error: --device cuda: this machine has no CUDA device (or this torch is built without "
                    "CUDA): use --device cpu, or leave --device out")


@pytest.mark.parametrize("flag", ["--seq_len", "--piece_len", "--batch_size", "--n_rows"])
def test_analyze_refuses_non_positive_numbers(done, capsys, flag):
    line = command_error(capsys, ["analyze", "--ckpt", str(done / "ckpt" / "last.ckpt"), "--device", "cpu", flag, "0"])
    assert line.startswith(f"analyze: error: {flag} must be >= 1 (got 0)")


def test_non_finite_loss_curve_gives_no_verdict():
    positions = np.arange(16, 257, 16)
    verdict = judge_forgetting(positions, np.full(positions.shape, np.nan), 64, bucket=16)
    assert verdict.forgets is None and "the loss is not finite" in verdict.undetermined
    assert verdict.text().startswith("undetermined (the loss is not finite")
    curve = np.linspace(3, 2, positions.size)
    curve[-3] = np.inf
    assert judge_forgetting(positions, curve, 64, bucket=16).forgets is None


def test_analyze_of_a_diverged_checkpoint_is_undetermined(done, tmp_path, corpus, capsys):
    checkpoint = torch.load(done / "ckpt" / "last.ckpt", weights_only=True)
    for name, tensor in checkpoint["state_dict"].items():
        if "embedding" in name:
            tensor.fill_(float("nan"))
    torch.save(checkpoint, tmp_path / "diverged.ckpt")
    assert main_code(["analyze", "--ckpt", str(tmp_path / "diverged.ckpt"), "--device", "cpu", "--n_rows", "2",
                      "--length", "256", "--text", corpus, "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "verdict: undetermined: the loss is not finite" in out
    verdict = json.loads((tmp_path / "out" / "verdict.json").read_text())["verdict"]
    assert verdict["forgets"] is None and "diverged" in verdict["undetermined"]


# ---- make train -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("knob,value", [("TOKENS_PER_BATCH", "abc"), ("LEN", "0"), ("STATE", "abc"), ("STEPS", "-5"),
                                        ("LEN", "1.5")])
def test_make_train_refuses_a_knob_that_is_not_a_positive_integer(knob, value):
    r = subprocess.run(["make", "-n", "train", f"{knob}={value}"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "lightning-mamba fit" not in r.stdout
    (line,) = r.stderr.strip().splitlines()
    assert f"*** {knob}={value} is not a positive integer: give one, e.g. make train {knob}=" in line


def test_make_train_passes_good_knobs():
    r = subprocess.run(["make", "-n", "train", "STATE=16", "LEN=128", "STEPS=5", "TOKENS_PER_BATCH=1024"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "--model.d_state 16 --data.seq_len 128 --data.batch_size 8" in r.stdout


@pytest.mark.parametrize("argv,line", [
    (["analyze", "--ckpt", "x.ckpt", "--seq_len", "abc"], "error: seq_len: expected an int or null, got abc"),
    (["sweep", "--states", "x"], "error: states: expected a list, got 'x'"),
    (["export"], "error: the following arguments are required: ckpt"),
    (["passkey", "--ckpt", "x.ckpt", "--bogus", "1"], "error: unrecognized arguments: --bogus 1"),
])
def test_command_argument_errors_are_one_line(capsys, argv, line):
    assert main_code(argv) == 2
    err = capsys.readouterr().err
    assert "usage:" not in err and err.strip().splitlines() == [line, f"  (the options: `lightning-mamba {argv[0]} "
                                                                      f"--help`)"]
