"""SIGTERM (what SLURM sends before it kills a job) mid-run: `lightning-mamba fit` saves last.ckpt at the end of the
batch, exits 143 (128 + SIGTERM) with one line that says how to resume, and the resumed run gives the losses of the
uninterrupted one to the last bit (CPU)."""

import json
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
import yaml

from lightning_mamba.cli import main
from lightning_mamba.commands import sweep

from .conftest import logged_losses, run_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 10


class Progress(L.Callback):
    """Write the number of finished steps to ``path`` after each step, then sleep (time to send a signal)."""

    def __init__(self, path: str, seconds: float = 0.3):
        self.path, self.seconds = path, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "w") as f:
            f.write(str(trainer.global_step))
        time.sleep(self.seconds)


class ValidationProgress(L.Callback):
    """Write "<global step> <batch>" after each validation batch of the fit, then sleep (time to send a signal)."""

    def __init__(self, path: str, seconds: float = 0.5):
        self.path, self.seconds = path, seconds

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            with open(self.path, "w") as f:
                f.write(f"{trainer.global_step} {batch_idx}")
            time.sleep(self.seconds)


def sigterm_mid_run(argv: list[str], progress: str, env: dict | None = None,
                    ready: tuple[str, ...] = ("3", "4", "5"), sig: int = signal.SIGTERM) -> tuple[int, str]:
    """Start ``argv`` in ROOT, send ``sig`` once ``progress`` (a Progress callback's file) reads one of ``ready``
    (steps 3-5), and return its exit status and stderr. The child starts with SIGINT's default disposition (a test
    run in a background job inherits it ignored), so Python installs its own handler, as in a terminal."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    try:
        while not (os.path.isfile(progress) and open(progress).read().strip() in ready):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the run did not reach the step"
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, err


def config(folder, corpus, cache_dir, progress: str | None = None) -> str:
    """The tiny run, with ModelCheckpoint saving only every 100 steps: the checkpoint a SIGTERM leaves is its own."""
    callbacks = [{"class_path": "tests.robust.test_sigterm.Progress", "init_args": {"path": progress}}] if progress else []
    path = run_config(folder, corpus, cache_dir, STEPS, callbacks=callbacks)
    with open(path) as f:
        cfg = yaml.safe_load(f)
    cfg["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 100
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def test_sigterm_saves_a_checkpoint_exits_nonzero_and_resumes_exactly(tmp_path, corpus, cache_dir):
    assert torch.get_num_threads() == 1
    main(["fit", "--config", config(tmp_path / "reference", corpus, cache_dir)])
    reference = logged_losses(tmp_path / "reference")
    assert sorted(reference) == list(range(STEPS))

    folder, progress = tmp_path / "run", str(tmp_path / "progress")
    cfg = config(folder, corpus, cache_dir, progress)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as the in-process runs: same reductions, same bits
    code, err = sigterm_mid_run([sys.executable, "-m", "lightning_mamba.cli", "fit", "--config", cfg], progress, env)
    assert code == 128 + signal.SIGTERM, err[-2000:]  # was 0
    last = folder / "ckpt" / "last.ckpt"
    stopped_at = torch.load(last, weights_only=True)["global_step"]
    assert 3 <= stopped_at < STEPS  # mid-run, and the only checkpoint: ModelCheckpoint saves every 100 steps
    line = next(line for line in err.splitlines() if line.startswith("error: "))
    assert line == (f"error: stopped by SIGTERM at global step {stopped_at}: resume with: lightning-mamba fit "
                    f"--config {folder / 'runs' / 'tiny' / 'version_0' / 'config.yaml'} --ckpt_path {last}")

    main(["fit", "--config", config(folder, corpus, cache_dir), "--ckpt_path", str(last)])
    resumed = logged_losses(folder, version=str(folder / "runs" / "tiny" / "version_1"))
    assert sorted(resumed) == list(range(stopped_at, STEPS))
    assert resumed == {s: reference[s] for s in resumed}  # exact, no tolerance


def test_ctrl_c_stops_after_the_step_with_a_checkpoint(tmp_path, corpus, cache_dir):
    """Ctrl-C (SIGINT) mid-fit: the step finishes, last.ckpt is saved there and the run exits 130 with the line that
    says how to resume (Lightning stopped at once with nothing saved: up to a checkpoint interval lost)."""
    folder, progress = tmp_path / "run", str(tmp_path / "progress")
    cfg = config(folder, corpus, cache_dir, progress)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code, err = sigterm_mid_run([sys.executable, "-m", "lightning_mamba.cli", "fit", "--config", cfg], progress, env,
                                sig=signal.SIGINT)
    assert code == 128 + signal.SIGINT, err[-2000:]
    assert "Ctrl-C: stopping after this step with last.ckpt saved" in err
    assert "weights_only" not in err  # Lightning's "`weights_only` was not set" line between the two of ours
    last = folder / "ckpt" / "last.ckpt"
    stopped_at = torch.load(last, weights_only=True)["global_step"]
    assert 3 <= stopped_at < STEPS
    line = next(line for line in err.splitlines() if line.startswith("error: "))
    assert line == (f"error: stopped by Ctrl-C (SIGINT) at global step {stopped_at}: resume with: lightning-mamba fit "
                    f"--config {folder / 'runs' / 'tiny' / 'version_0' / 'config.yaml'} --ckpt_path {last}")


def test_sigterm_during_validation_finishes_it_then_saves(tmp_path, corpus, cache_dir):
    """A SIGTERM in the first of three validation batches at step 4 (it stopped there with nothing saved since the
    step before, ModelCheckpoint saving every 100 steps): the validation is finished and logged, last.ckpt is saved
    at step 4, the run exits 143 with the line that says how to resume, and the resume trains on to the end."""
    folder, progress = tmp_path / "run", str(tmp_path / "progress")
    path = config(folder, corpus, cache_dir)
    cfg = yaml.safe_load(open(path))
    cfg["trainer"].update(val_check_interval=2, limit_val_batches=3, num_sanity_val_steps=0)
    cfg["trainer"]["callbacks"].append({"class_path": "tests.robust.test_sigterm.ValidationProgress",
                                        "init_args": {"path": progress}})
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code, err = sigterm_mid_run([sys.executable, "-m", "lightning_mamba.cli", "fit", "--config", path], progress,
                                env, ready=("4 0",))
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert open(progress).read() == "4 2"  # the validation went on to its last batch
    last = folder / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert sorted(logged_losses(folder, metric="val/loss")) == [1, 3]  # (the validations after steps 2 and 4)
    line = next(line for line in err.splitlines() if line.startswith("error: "))
    assert line.startswith("error: stopped by SIGTERM at global step 4: resume with: lightning-mamba fit --config ")

    cfg["trainer"]["callbacks"].pop()
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    main(["fit", "--config", path, "--ckpt_path", str(last)])
    resumed = logged_losses(folder, version=str(folder / "runs" / "tiny" / "version_1"))
    assert sorted(resumed) == list(range(4, STEPS))


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_sigterm_in_a_sweep_saves_the_cell_exits_nonzero_and_a_rerun_resumes_it(tmp_path, corpus, cache_dir, capsys):
    """The same in `lightning-mamba sweep` (a SLURM array task): the cell's last.ckpt at the signalled step, exit
    143 with one line naming the cell and how to go on (it exited 0, as if the sweep had finished, and kept only
    ModelCheckpoint's last interval), and the same command then resumes that cell from the step it reached."""
    progress = str(tmp_path / "progress")
    with open(os.path.join(ROOT, "configs", "train.yaml")) as f:
        base = yaml.safe_load(f)
    base["trainer"]["callbacks"].append({"class_path": "tests.robust.test_sigterm.Progress",
                                         "init_args": {"path": progress}})
    base_path = tmp_path / "base.yaml"
    base_path.write_text(yaml.safe_dump(base, sort_keys=False))
    out = tmp_path / "study"
    data = {"tokenizer": "byte", "source": corpus, "cache_dir": cache_dir}
    args = ["--config", os.path.join(ROOT, "configs", "study", "forget_threshold_cpu.yaml"), "--base_config",
            f'["{base_path}"]', "--out", str(out), "--data_overrides", json.dumps(data), "--states", "[8]",
            "--lens", "[32]", "--tensorboard", "false"]
    code, err = sigterm_mid_run([sys.executable, "-m", "lightning_mamba.cli", "sweep", *args], progress)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    last = out / "cells" / "state8_len32" / "checkpoints" / "last.ckpt"
    stopped_at = torch.load(last, weights_only=True)["global_step"]
    assert 3 <= stopped_at < 8
    line = next(line for line in err.splitlines() if line.startswith("sweep: error: "))
    assert line == (f"sweep: error: stopped by SIGTERM at global step {stopped_at}: {last} saved: run the same sweep "
                    f"command again to resume state8_len32")
    assert not (out / "cells" / "state8_len32" / "result.json").exists()

    os.remove(progress)
    # the same command again, in this process (a second interpreter would only add ~6 s of imports)
    capsys.readouterr()
    assert sweep.main(args) == 0
    assert f"resuming from {last}" in capsys.readouterr().out
    assert json.loads((out / "cells" / "state8_len32" / "result.json").read_text())["steps"] == 8
