"""passkey-trend: accuracy along training from the callback's step_N.json files, and the early-vs-late test of
beyond-window accuracy (falls / flat / rises), through the command as a user runs it."""

import json

import numpy as np
import pytest

from lightning_mamba.analysis.passkey import PasskeyGrid
from lightning_mamba.cli import main
from lightning_mamba.study.passkey_trend import PasskeyTrendError, load_history, trend

T = 100
LENGTHS = [100, 200, 400]  # 1x, 2x, 4x
DEPTHS = [0.25, 0.75]  # needle distances (1 - depth) x length / T: 0.75, 1.5, 3 and 0.25, 0.5, 1
SAMPLES = 20


def write_eval(run, step, hits_by_length, rng):
    """A step_N.json as PasskeyEvalCallback writes it (PasskeyGrid.to_dict), with ``hits_by_length[j]`` correct
    prompts (of depths x samples) at length j, spread over the cells at random."""
    correct = np.zeros((len(DEPTHS), len(LENGTHS), SAMPLES), dtype=bool)
    for j, hits in enumerate(hits_by_length):
        flat = np.zeros(len(DEPTHS) * SAMPLES, dtype=bool)
        flat[rng.choice(flat.size, hits, replace=False)] = True
        correct[:, j, :] = flat.reshape(len(DEPTHS), SAMPLES)
    grid = PasskeyGrid(LENGTHS, DEPTHS, correct, correct.astype(float))
    (run / "passkey").mkdir(parents=True, exist_ok=True)
    (run / "passkey" / f"step_{step}.json").write_text(json.dumps({"step": step, "seq_len": T, **grid.to_dict(0.95, T)}))


def cli(*args) -> int:
    """lightning-mamba passkey-trend ARGS as a user runs it: its exit status."""
    with pytest.raises(SystemExit) as e:
        main(["passkey-trend", *args])
    return e.value.code


@pytest.fixture
def falling_run(tmp_path):
    """Learned by step 200; 2x stays at 36/40, 4x drops from 30/40 to 8/40 over training."""
    rng = np.random.default_rng(0)
    run = tmp_path / "run" / "version_0"
    history = {100: (5, 0, 0), 200: (40, 36, 30), 300: (40, 36, 31), 400: (39, 35, 20), 500: (40, 36, 9),
               600: (40, 36, 8)}
    for step, hits in history.items():
        write_eval(run, step, hits, rng)
    return run


def test_falling_accuracy_is_found_and_flat_is_flat(falling_run):
    t = trend(load_history(str(falling_run)))
    assert t["steps"] == [100, 200, 300, 400, 500, 600] and t["saturated_at"] == 200
    assert t["early_steps"] == [200, 300] and t["late_steps"] == [500, 600]
    tests = {c["what"]: c for c in t["tests"]}
    assert tests["4x (400)"]["verdict"] == "falls" and tests["4x (400)"]["z"] > 4
    assert tests["4x (400)"]["early"] == pytest.approx(61 / 80) and tests["4x (400)"]["late"] == pytest.approx(17 / 80)
    assert tests["2x (200)"]["verdict"] == "flat" and tests["2x (200)"]["z"] == pytest.approx(0)
    assert tests["4x (400)"]["prompts"] == [80, 80]
    assert {"distance 1-2x", "distance 2-4x"} <= set(tests)  # the 0-1x bucket is not a beyond-window test


def test_rising_and_too_short_runs(tmp_path):
    rng = np.random.default_rng(1)
    run = tmp_path / "rises"
    for step, hits in {1: (40, 10, 2), 2: (40, 12, 3), 3: (40, 30, 20), 4: (40, 32, 22)}.items():
        write_eval(run, step, hits, rng)
    t = trend(load_history(str(run)))
    assert {c["what"]: c["verdict"] for c in t["tests"]}["4x (400)"] == "rises"
    short = trend(load_history(str(run)), window=3)
    assert short["tests"] == [] and "the test needs 6" in short["note"]
    never = trend(load_history(str(run)), threshold=1.01)
    assert never["saturated_at"] is None and "never reached" in never["note"]


def test_command_prints_tables_and_the_verdict_and_writes_json_and_png(falling_run, capsys):
    assert cli("--run", str(falling_run)) == 0
    out = capsys.readouterr().out
    assert "| step | 1x (100) | 2x (200) | 4x (400) |" in out and "| 600 | 1.00 | 0.90 | 0.20 |" in out
    assert "beyond-window accuracy falls along training at: 4x (400)" in out
    saved = json.loads((falling_run / "passkey" / "trend.json").read_text())
    assert saved["saturated_at"] == 200 and (falling_run / "passkey" / "trend.png").stat().st_size > 1000


@pytest.mark.parametrize("args,fragment", [
    (["--window", "0"], "--window must be >= 1"),
    (["--threshold", "1.5"], "--threshold must be in (0, 1]"),
    (["--z", "0"], "--z must be > 0"),
])
def test_bad_arguments_are_one_line(falling_run, capsys, args, fragment):
    assert cli("--run", str(falling_run), *args) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1


def test_a_run_without_evaluations_or_with_mixed_grids_is_refused(tmp_path, falling_run, capsys):
    (tmp_path / "empty").mkdir()
    assert cli("--run", str(tmp_path / "empty")) == 2
    assert "holds no passkey evaluations" in capsys.readouterr().err
    record = json.loads((falling_run / "passkey" / "step_600.json").read_text())
    record["step"], record["samples_per_cell"] = 700, 4
    (falling_run / "passkey" / "step_700.json").write_text(json.dumps(record))
    with pytest.raises(PasskeyTrendError, match="step 700 scored another grid"):
        load_history(str(falling_run))


def test_slope_over_all_evaluations_uses_their_scatter(falling_run):
    """Beside z: the least-squares slope per 1000 steps over every evaluation from saturation on, with its t from the
    evaluations' residual scatter, and that scatter against one evaluation's binomial SD."""
    tests = {c["what"]: c for c in trend(load_history(str(falling_run)))["tests"]}
    x = np.array([0.2, 0.3, 0.4, 0.5, 0.6])  # steps 200..600 in thousands
    for what, hits in (("4x (400)", [30, 31, 20, 9, 8]), ("2x (200)", [36, 36, 35, 36, 36])):
        y = np.array(hits) / 40
        slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
        sd = np.sqrt(((y - y.mean() - slope * (x - x.mean())) ** 2).sum() / 3)
        c = tests[what]
        assert c["slope_per_1k"] == pytest.approx(slope, abs=1e-12) and c["scatter_sd"] == pytest.approx(sd)
        assert c["slope_t"] == pytest.approx(slope / (sd / np.sqrt(((x - x.mean()) ** 2).sum())), abs=1e-9)
        assert c["binomial_sd"] == pytest.approx(np.sqrt(y.mean() * (1 - y.mean()) / 40))
    assert tests["4x (400)"]["slope_t"] < -3 and abs(tests["2x (200)"]["slope_t"]) < 1e-9  # falls; level (symmetric dip)
