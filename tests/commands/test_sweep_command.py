"""`lightning-mamba sweep` end to end on the CPU: a micro study (2 states x 2 lengths, a few steps) writes every
output; a re-run skips finished cells; a cell killed mid-training resumes from its last.ckpt. The shipped study
configs validate and their cells build."""

import csv
import json
import os
import re
import shlex
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

from lightning_mamba.cli import lightning_cli, main
from lightning_mamba.commands import sweep as cmd
from lightning_mamba.study.sweep import build_cli, make_cells

from ..micro_study import MICRO, ROOT, TRAIN, micro_args

GPU = os.path.join(ROOT, "configs", "study", "forget_threshold.yaml")


class Crash(L.Callback):
    """Stands in for a killed job: raises once training reaches ``at_step``."""

    def __init__(self, at_step: int = 5):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.at_step:
            raise RuntimeError("simulated kill")


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_micro_study_writes_everything_and_a_rerun_skips_finished_cells(tmp_path, corpus, capsys):
    out = tmp_path / "study"
    assert cmd.main(micro_args(tmp_path, corpus, out)) == 0
    printed = capsys.readouterr().out
    assert "paper: a = 5.172, b = -4.469" in printed and "| state8 |" in printed
    names = ["state8_len32", "state8_len64", "state16_len32", "state16_len64"]
    for name in names:
        cell = out / "cells" / name
        r = json.loads((cell / "result.json").read_text())
        assert r["cell"] == name and r["steps"] == 4 and r["tokens"] == 1024 and r["eval"]["length"] == 4 * r["seq_len"]
        assert r["n_s"] > r["n_s_ssm_only"] > 0 and set(r["verdict"]) >= {"forgets", "blowup_position"}
        assert (cell / "config.yaml").exists() and (cell / "checkpoints" / "last.ckpt").exists()
        assert list(cell.glob("events.out.tfevents.*"))
    # the run directory's config is a normal one: `lightning-mamba fit --config <cell>/config.yaml` would take it
    cli = lightning_cli(["--config", str(out / "cells" / "state16_len64" / "config.yaml")], run=False)
    assert cli.model.hparams.d_state == 16 and cli.datamodule.hparams.seq_len == 64
    assert cli.datamodule.hparams.batch_size == 4 and cli.trainer.max_steps == 4
    summary = json.loads((out / "summary.json").read_text())
    assert [r["row"] for r in summary["rows"]] == ["state8", "state16"] and summary["cells_done"] == 4
    # onset tracking reads the evaluations the observers wrote along each cell's training (the base config's
    # LengthGeneralizationCallback and StateStatsCallback)
    for name in names:
        history = summary["onset"]["cells"][name]["history"]
        assert history and history[-1]["step"] == 4 and history[-1]["tokens"] == 1024
        assert history[-1]["forgets"] in (True, False) and history[-1]["heads_alpha_T_above"] is not None
    assert set(summary["onset"]["t_forget_by_step"]) == {"state8", "state16"}
    assert len((out / "results.csv").read_text().splitlines()) == 5
    for png in ("t_forget_vs_state_size", "loss_curves"):
        assert (out / f"{png}.png").stat().st_size > 0
    assert list((out / "summary").glob("events.out.tfevents.*"))
    # every row's T_forget, or its bound either way ("> max LEN", "<= min LEN"), is a scalar over N_S (the upper
    # bound had none: in a study whose rows all forget at their shortest LEN the summary run held no scalar)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "summary")).Reload()
    keys = ("t_forget", "t_forget_lower_bound", "t_forget_upper_bound")
    wanted = sorted((f"study/{k}", r[k]) for r in summary["rows"] for k in keys if r.get(k) is not None)
    drawn = sorted((tag, e.value) for tag in events.Tags()["scalars"] if tag.startswith("study/t_forget")
                   for e in events.Scalars(tag))
    assert drawn == wanted and len(wanted) == len(summary["rows"]), (drawn, summary["rows"])

    mtimes = {n: (out / "cells" / n / "result.json").stat().st_mtime_ns for n in names}
    assert cmd.main(micro_args(tmp_path, corpus, out)) == 0
    printed = capsys.readouterr().out
    assert sum(f"{n}: done already" in printed for n in names) == 4 and ": training " not in printed
    assert mtimes == {n: (out / "cells" / n / "result.json").stat().st_mtime_ns for n in names}

    assert cmd.main(micro_args(tmp_path, corpus, out, "--summarize_only", "true")) == 0
    assert "written to" in capsys.readouterr().out


def test_a_killed_cell_resumes_from_its_last_checkpoint(tmp_path, corpus, capsys):
    out = tmp_path / "study"
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"save_last": True, "every_n_train_steps": 2}}
    crash = {"class_path": f"{__name__}.Crash", "init_args": {"at_step": 5}}
    trainer = {"enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0}
    one_cell = ["--states", "[8]", "--lens", "[32]", "--tokens_per_cell", "2048"]  # 8 steps: killed at 5
    with pytest.raises(RuntimeError, match="simulated kill"):
        cmd.main(micro_args(tmp_path, corpus, out, *one_cell,
                            "--trainer_overrides", json.dumps({**trainer, "callbacks": [checkpoint, crash]})))
    cell = out / "cells" / "state8_len32"
    assert not (cell / "result.json").exists()
    assert torch.load(cell / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4

    assert cmd.main(micro_args(tmp_path, corpus, out, *one_cell,
                               "--trainer_overrides", json.dumps({**trainer, "callbacks": [checkpoint]}))) == 0
    assert "resuming from" in capsys.readouterr().out
    r = json.loads((cell / "result.json").read_text())
    assert r["resumed_from"].endswith("last.ckpt") and r["steps"] == 8
    assert torch.load(cell / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 8


def test_a_cell_resumed_at_its_last_step_keeps_its_validation_loss(tmp_path, corpus, capsys):
    """A cell killed (or failed) during its final evaluation resumes from last.ckpt at its last step: nothing is
    trained, Lightning does not validate again, and result.json had val_loss None where the uninterrupted run had a
    number. It is read back from the cell's val/step_<N>.json record."""
    out = tmp_path / "study"
    one_cell = ["--states", "[8]", "--lens", "[32]"]
    assert cmd.main(micro_args(tmp_path, corpus, out, *one_cell)) == 0
    done = out / "cells" / "state8_len32" / "result.json"
    first = json.loads(done.read_text())
    assert first["val_loss"] is not None
    done.unlink()  # as after a kill during the final evaluation
    assert cmd.main(micro_args(tmp_path, corpus, out, *one_cell)) == 0
    assert "resuming from" in capsys.readouterr().out
    again = json.loads(done.read_text())
    assert again["val_loss"] == first["val_loss"] and again["verdict"] == first["verdict"]


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_a_cells_config_yaml_runs_beside_the_cell_not_into_it(tmp_path, corpus, capsys):
    """`fit --config <cell>/config.yaml` (docs/study.md: it reproduces the cell) trained into the cell's own folder
    (its logger version '' is that folder): a second events file, last-v1.ckpt, its records along training
    rewritten; `validate` with it replaced the cell's config.yaml. fit is refused now, validate logs to a version of
    its own, and fit with another save_dir reproduces the cell."""
    out = tmp_path / "study"
    assert cmd.main(micro_args(tmp_path, corpus, out, "--states", "[8]", "--lens", "[32]")) == 0
    cell = out / "cells" / "state8_len32"
    config = cell / "config.yaml"
    before = {p.name: p.read_bytes() for p in cell.iterdir() if p.is_file()}
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(config)])
    assert "already holds a run" in str(e.value.code) and "save_dir" in str(e.value.code)
    main(["validate", "--config", str(config), "--ckpt_path", str(cell / "checkpoints" / "last.ckpt")])
    assert {p.name: p.read_bytes() for p in cell.iterdir() if p.is_file()} == before
    assert sorted(os.listdir(cell / "checkpoints")) == ["last.ckpt"]
    capsys.readouterr()
    main(["fit", "--config", str(config), "--trainer.logger.init_args.save_dir", str(tmp_path / "repro")])
    again = tmp_path / "repro" / "state8_len32" / "val" / "step_4.json"
    assert json.loads(again.read_text()) == json.loads((cell / "val" / "step_4.json").read_text())


def test_bad_settings_are_one_line_errors(tmp_path, corpus, capsys):
    assert cmd.main(micro_args(tmp_path, corpus, tmp_path / "o", "--tokens_per_batch", "100")) == 2
    assert "sweep: error: tokens_per_batch=100 must be a multiple of every LEN" in capsys.readouterr().err
    assert cmd.main(micro_args(tmp_path, corpus, tmp_path / "o", "--threshold", "0.5")) == 2
    assert "sweep: error: threshold must be a finite number > 1 (got 0.5): it is a loss ratio" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--processes", "2"], ["--merge", "[a, b]"], ["--map_summaries", "[a.json]"]])
@pytest.mark.parametrize("below", [False, True])
def test_an_out_that_is_a_file_is_one_line_before_anything_runs(tmp_path, capsys, extra, below):
    """--out README.md (or a folder under a file) was "sweep: error: [Errno 20] Not a directory: 'README.md/cells'",
    which does not say which setting to change."""
    file = tmp_path / "notes.txt"
    file.write_text("not a study")
    out = file / "study" if below else file
    assert cmd.main(micro_args(tmp_path, str(tmp_path / "corpus"), out, *extra)) == 2
    err = capsys.readouterr().err
    assert err == f"sweep: error: out={str(out)!r} is not a folder ({file} is a file): give --out a folder, e.g. " \
                  "runs/study/forget_threshold\n"
    assert file.read_text() == "not a study"


@pytest.mark.parametrize("path", [MICRO, GPU])
def test_shipped_study_configs_validate_and_their_cells_build(path, tmp_path, capsys):
    args = cmd.build_parser().parse_args(["--config", path, "--out", str(tmp_path / "o"),
                                          "--base_config", json.dumps([TRAIN])])
    study = cmd.study_from(args)
    study.validate()
    study.data_overrides["cache_dir"] = str(tmp_path / "cache")
    cells = make_cells(study)
    assert len(cells) == len(study.states) * len(study.lens)
    cli = build_cli(study, cells[-1])  # the largest state at the longest length
    assert cli.model.hparams.d_state == study.states[-1] and cli.datamodule.hparams.seq_len == study.lens[-1]
    assert cli.datamodule.hparams.batch_size * study.lens[-1] == study.tokens_per_batch
    assert cli.trainer.max_steps == study.steps
    assert cmd.main(["--config", path, "--dry_run", "true", "--shard", "1/2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(cells) // 2


def test_the_gpu_study_fits_its_stated_budget():
    study = cmd.study_from(cmd.build_parser().parse_args(["--config", GPU]))
    assert study.steps == 512 and study.tokens_per_cell == 2**25
    total = study.tokens_per_cell * len(study.states) * len(study.lens)
    assert 15 <= total / 600e3 / 60 <= 20  # GPU-minutes of training at ~600K tokens/s (the config's comment)


def make_sweep_line(makefile="Makefile", target="sweep", **knobs) -> list[str]:
    """The command `make <target>` would run, as argv for `lightning-mamba sweep`; skips until the target exists."""
    r = subprocess.run(["make", "-f", makefile, "-n", "-s", target, *(f"{k}={v}" for k, v in knobs.items())],
                       cwd=ROOT, capture_output=True, text=True)
    if "No rule to make target" in r.stderr:
        pytest.skip(f"the Makefile has no {target} target")
    line = next(l for l in r.stdout.replace("\\\n", " ").splitlines() if "lightning-mamba sweep" in l)
    argv = shlex.split(line)
    return [os.path.join(ROOT, a) if a.startswith("configs/") else a for a in argv[argv.index("sweep") + 1:]]


def test_make_regime_runs_one_cell_at_a_time_unless_told_to_share_under_mps():
    parser = cmd.build_parser()
    default = parser.parse_args(make_sweep_line(target="regime"))
    assert default.processes == 1 and default.mps is False
    shared = parser.parse_args(make_sweep_line(target="regime", PROCESSES="4", MPS="1"))
    assert shared.processes == 4 and shared.mps is True
    named = cmd.study_from(parser.parse_args(make_sweep_line(target="regime", CELLS="state2048_len32 state1024_len16")))
    assert named.cells == ["state2048_len32", "state1024_len16"]
    assert cmd.study_from(default).cells is None


def test_make_sweep_line_parses_with_states_lens_and_shard():
    study = cmd.study_from(cmd.build_parser().parse_args(
        make_sweep_line(STATES="16 64", LENS="256 1024", SHARD="1/4", ARGS="--tokens_per_cell 1048576")))
    assert study.states == [16, 64] and study.lens == [256, 1024] and study.shard == "1/4"
    assert study.tokens_per_cell == 1048576
    default = cmd.study_from(cmd.build_parser().parse_args(make_sweep_line()))
    assert default.states == [16, 32, 64, 128] and default.lens == [128, 256, 512, 1024, 2048]
    assert default.time_per_cell is None
    budget = cmd.study_from(cmd.build_parser().parse_args(make_sweep_line(BUDGET="00:02:00:00")))
    assert budget.time_per_cell == "00:02:00:00"
    assert cmd.study_from(cmd.build_parser().parse_args(make_sweep_line(CELLS="state16_len256"))).cells == [
        "state16_len256"]


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_processes_runs_the_shards_at_once_and_names_a_failed_one_after_the_summary_of_the_others(tmp_path, corpus,
                                                                                                   capsys):
    """Every shard succeeding (both cells trained, each in its shard's log, and summarized) is checked on the same
    command under the sweep's MPS daemon, tests/commands/test_mps.py: the daemon only adds environment variables to
    the same launch, and a second run of it here cost ~15 s. Here shard 1's cell folder is taken by a file."""
    out = tmp_path / "study"
    os.makedirs(out / "cells")
    (out / "cells" / "state8_len64").write_text("a file where shard 1's cell folder goes")
    args = micro_args(tmp_path, corpus, out, "--states", "[8]", "--processes", "2")
    assert cmd.main(args) != 0
    captured = capsys.readouterr()
    assert "2 shards started" in captured.out
    # cell k goes to shard k % 2: shard 0 trains its cell at the same time, and the summary shows it
    assert "sweep: state8_len32: training" in (out / "logs" / "shard_0.log").read_text()
    assert "1 of 2 shards failed (shard 1: " in captured.err and "shard_1.log" in captured.err
    assert "| state8 |" in captured.out and (out / "cells" / "state8_len32" / "result.json").exists()
    assert cmd.main([*args, "--shard", "0/2"]) != 0 and "drop --shard 0/2" in capsys.readouterr().err


def test_make_sweep_line_passes_seeds():
    study = cmd.study_from(cmd.build_parser().parse_args(make_sweep_line(STATES="16", SEEDS="0 1 2")))
    assert study.seeds == [0, 1, 2] and study.states == [16]
    assert cmd.study_from(cmd.build_parser().parse_args(make_sweep_line())).seeds is None


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_two_seeds_of_one_cell_train_two_different_models(tmp_path, corpus, capsys):
    out = tmp_path / "study"
    assert cmd.main(micro_args(tmp_path, corpus, out, "--states", "[8]", "--lens", "[32]", "--seeds", "[0,1]")) == 0
    printed = capsys.readouterr().out
    assert "| state8 |" in printed and "32: fails " in printed and "/2" in printed
    runs = {s: out / "cells" / f"state8_len32_seed{s}" for s in (0, 1)}
    results = {s: json.loads((cell / "result.json").read_text()) for s, cell in runs.items()}
    assert [results[s]["seed"] for s in (0, 1)] == [0, 1]
    assert results[0]["curve"]["loss"] != results[1]["curve"]["loss"]
    weights = {s: torch.load(cell / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
               for s, cell in runs.items()}
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    summary = json.loads((out / "summary.json").read_text())
    (row,) = summary["rows"]
    assert row["seeds"] == [0, 1] and row["fails_per_len"]["32"]["finished"] == 2
    assert [e["seed"] for e in row["t_forget_per_seed"]] == [0, 1]
    assert set(summary["onset"]["cells"]) == {"state8_len32_seed0", "state8_len32_seed1"}


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_a_cell_out_of_time_is_left_to_resume_and_the_sweep_goes_on(tmp_path, corpus, capsys):
    """A time budget per cell (time_per_cell: the Trainer's max_time): the first cell stopping does not end the sweep; every cell
    gets its budget, none is recorded as done, the command succeeds and says how to resume; the same command without
    the budget then finishes them from where they stopped."""
    out = tmp_path / "study"
    budget = ["--states", "[8]", "--time_per_cell", "00:00:00:00"]
    assert cmd.main(micro_args(tmp_path, corpus, out, *budget)) == 0
    printed = capsys.readouterr().out
    names = ["state8_len32", "state8_len64"]
    for name in names:
        assert re.search(rf"{name}: training stopped at step \d of 4: its time budget", printed), printed
        assert not (out / "cells" / name / "result.json").exists()
    assert "2 cell(s) stopped by their time budget" in printed and "run the same command again" in printed
    assert "provisional" in printed  # the summary still ran, from the cells' evaluations along training
    assert cmd.main(micro_args(tmp_path, corpus, out, "--states", "[8]")) == 0
    printed = capsys.readouterr().out
    for name in names:
        assert f"{name}: training 4 steps" in printed
        assert json.loads((out / "cells" / name / "result.json").read_text())["steps"] == 4


class SlowSteps(L.Callback):
    """Makes each step take at least ``seconds``, so a time budget ends a cell after a few steps."""

    def __init__(self, seconds: float = 0.25):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, *args) -> None:
        time.sleep(self.seconds)


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_each_run_of_a_budgeted_sweep_trains_its_cells_further(tmp_path, corpus, capsys):
    """time_per_cell counts each run of the command: the same command again resumes a stopped cell from the step where
    it stopped and gives it the budget again. Lightning's Timer restores the time already trained, so the re-run used
    to stop at once (tests/robust/test_time_limit.py: last.ckpt at the stop when an interval checkpoint came first)."""
    out = tmp_path / "study"
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"save_last": True, "every_n_train_steps": 2}}
    slow = {"class_path": f"{__name__}.SlowSteps", "init_args": {"seconds": 0.25}}
    trainer = {"enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
               "callbacks": [checkpoint, slow]}
    argv = micro_args(tmp_path, corpus, out, "--states", "[8]", "--lens", "[32]", "--tokens_per_cell", "10240",
                      "--trainer_overrides", json.dumps(trainer), "--time_per_cell", "00:00:00:01")
    last = out / "cells" / "state8_len32" / "checkpoints" / "last.ckpt"
    stops = []
    for _ in range(2):
        assert cmd.main(argv) == 0
        printed = capsys.readouterr().out
        stops.append(int(re.search(r"training stopped at step (\d+) of 40", printed).group(1)))
        assert torch.load(last, weights_only=False)["global_step"] == stops[-1]  # the next run starts there
    assert 2 <= stops[0] and stops[1] >= stops[0] + 2, stops  # was no step more


def test_a_time_budget_beside_a_configured_timer_is_refused(tmp_path, corpus, capsys):
    """Lightning ignores max_time when the callbacks hold a Timer, and the sweep's per-run budget would replace that
    Timer: two budgets, one silently dropped. Refused before any training, with what to change."""
    timer = {"class_path": "lightning.pytorch.callbacks.Timer", "init_args": {"duration": "00:00:05:00"}}
    out = tmp_path / "study"
    code = cmd.main(micro_args(tmp_path, corpus, out, "--states", "[8]", "--lens", "[32]", "--time_per_cell",
                               "00:00:00:01", "--trainer_overrides", json.dumps({"callbacks": [timer]})))
    err = capsys.readouterr().err
    assert code == 2 and "time_per_cell and a lightning.pytorch.callbacks.Timer callback" in err and "keep one" in err
    assert not list(out.glob("cells/*/checkpoints/*.ckpt"))


def test_typed_overrides_merge_into_the_configs(capsys):
    """`--model_overrides '{...}'` after --config adds to the config's dict (jsonargparse alone would replace it:
    the regime's a_lr_mult 10 would be lost without a word); a key typed as null is removed."""
    regime = os.path.join(ROOT, "configs", "study", "regime.yaml")

    def fit_args(*typed: str) -> str:
        assert cmd.main(["--config", regime, "--cells", "[state2048_len16]", *typed, "--dry_run", "true"]) == 0
        return capsys.readouterr().out

    line = fit_args("--model_overrides", "{quadratic_max_len: 32, chunk_size: null}",
                    "--trainer_overrides={log_every_n_steps: 7}")
    assert "--model.a_lr_mult 10.0 " in line and "--model.quadratic_max_len 32 " in line
    assert "--model.quadratic_max_len 256" not in line  # the typed value replaces the config's
    assert "--model.chunk_size" not in line and "--trainer.log_every_n_steps 7 " in line
    assert "--trainer.enable_progress_bar false" in line  # the config's other trainer overrides stay
    untyped = fit_args()
    assert "--data.source code " in untyped and "--model.chunk_size 64 " in untyped
    assert "--model.quadratic_max_len 256 " in untyped  # the regime's attention form for short rows
    assert "--model.save_chunk_states true " in untyped


def test_print_config_shows_the_merged_overrides(capsys):
    """`--print_config` printed the typed `--model_overrides` dict alone (jsonargparse's replacement), not the merged
    one the cells train with: the regime's a_lr_mult 10 looked dropped. It prints the merged dicts now."""
    import yaml

    regime = os.path.join(ROOT, "configs", "study", "regime.yaml")
    for flag in ("--print_config", "--print_config=skip_null"):
        with pytest.raises(SystemExit) as e:
            cmd.main(["--config", regime, "--model_overrides", "{quadratic_max_len: 32, chunk_size: null}", flag])
        assert e.value.code == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["model_overrides"]["a_lr_mult"] == 10.0 and printed["model_overrides"]["quadratic_max_len"] == 32
        assert "chunk_size" not in printed["model_overrides"]
        assert printed["data_overrides"]["source"] == "code"
        assert ("eval_tokens" in printed) == (flag == "--print_config")


def test_an_unknown_model_override_points_at_fits_options(tmp_path, corpus, capsys):
    """A model_overrides key fit does not take: one line before any cell trains, pointing at `lightning-mamba fit
    --help` (where the model's options are), not at the bare `lightning-mamba --help`, which lists commands."""
    with pytest.raises(SystemExit) as e:
        cmd.main(micro_args(tmp_path, corpus, tmp_path / "o", "--model_overrides", "{bogus: 1}"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unrecognized arguments: --model.bogus 1" in err, err
    assert "(the options: `lightning-mamba fit --help`)" in err and not (tmp_path / "o" / "cells").exists()


def test_a_resumed_cell_records_the_training_time_of_every_run(tmp_path, corpus, capsys):
    """result.json's train_seconds is the last run's fit only (a cell resumed at its last steps read ~0 s);
    train_seconds_all_runs adds the earlier runs' training, from the throughput monitor's clock in last.ckpt."""
    out = tmp_path / "study"
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"save_last": True, "every_n_train_steps": 2}}
    monitor = {"class_path": "lightning_mamba.callbacks.TokenThroughputMonitor"}
    slow = {"class_path": f"{__name__}.SlowSteps", "init_args": {"seconds": 0.2}}
    crash = {"class_path": f"{__name__}.Crash", "init_args": {"at_step": 5}}
    trainer = {"enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0}
    one_cell = ["--states", "[8]", "--lens", "[32]", "--tokens_per_cell", "2048"]  # 8 steps: killed at 5
    with pytest.raises(RuntimeError, match="simulated kill"):
        cmd.main(micro_args(tmp_path, corpus, out, *one_cell, "--trainer_overrides",
                            json.dumps({**trainer, "callbacks": [checkpoint, monitor, slow, crash]})))
    assert cmd.main(micro_args(tmp_path, corpus, out, *one_cell, "--trainer_overrides",
                               json.dumps({**trainer, "callbacks": [checkpoint, monitor, slow]}))) == 0
    r = json.loads((out / "cells" / "state8_len32" / "result.json").read_text())
    # 4 slow steps before the checkpoint the resume starts from, 4 after it: >= 8 x 0.2 s in all, the first
    # run's 0.8 s included (the second run alone trained 4 steps)
    assert r["resumed_from"] and r["train_seconds_all_runs"] >= 8 * 0.2 * 0.95, r
    with open(out / "results.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["train_seconds_all_runs"]) == pytest.approx(r["train_seconds_all_runs"])


def test_a_missing_base_config_is_named_as_such(tmp_path, corpus, capsys):
    """jsonargparse named a base_config that is no file "config: File does not exist" (the cells' --config)."""
    out = tmp_path / "o"
    assert cmd.main([*micro_args(tmp_path, corpus, out), "--base_config", json.dumps(["nope.yaml"])]) == 2
    err = capsys.readouterr().err
    assert "sweep: error: base_config 'nope.yaml' is not a file: give the run config(s) every cell starts from" in err
    assert len(err.strip().splitlines()) == 1 and not (out / "cells").exists()


def test_processes_under_python_dash_m_start_shards_that_run_and_every_shard_failing_is_the_error_line(tmp_path,
                                                                                                        corpus):
    """`python -m lightning_mamba.commands.sweep --processes N` started each shard as `python -m __main__`, which
    Python cannot find: every shard died before our code ran, and the summary's "no study under" hid that. Here both
    cells' folders are taken by files, so each shard runs and fails on its own cell."""
    out = tmp_path / "study"
    os.makedirs(out / "cells")
    for name in ("state8_len32", "state8_len64"):
        (out / "cells" / name).write_text("a file where the cell's folder goes")
    args = micro_args(tmp_path, corpus, out, "--states", "[8]", "--processes", "2")
    run = subprocess.run([sys.executable, "-m", "lightning_mamba.commands.sweep", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "2 shards started" in run.stdout
    assert run.stderr.strip().splitlines()[-1].startswith("sweep: error: 2 of 2 shards failed (shard 0: ")
    for i in range(2):
        log = (out / "logs" / f"shard_{i}.log").read_text()
        assert "__spec__" not in log and f"state8_len{32 * (i + 1)}" in log, log[-2000:]
