"""After the NaN guard stops a run: no checkpoint newer than the last good weights is left to resume by mistake (those
holding the weights that failed are put aside as *.nonfinite), and the command it prints goes on from the last good
one at the lower lr it names (a --model.lr typed with --ckpt_path wins over the checkpoint's). A 'skip' run that ends
in skipped steps is an error, not a success."""

import glob
import os
import shlex

import pytest
import torch
import yaml

from lightning_mamba.cli import main

from .conftest import run_config


def config(folder, corpus, cache_dir, steps=8, keep_all=False, **model) -> str:
    path = run_config(folder, corpus, cache_dir, steps)
    with open(path) as f:
        cfg = yaml.safe_load(f)
    if keep_all:  # every step's checkpoint stays (Lightning's default keeps the newest only)
        cfg["trainer"]["callbacks"][0]["init_args"]["save_top_k"] = -1
    cfg["model"].update(model)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def fails(argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code, e.value.code
    return e.value.code


def checkpoints(folder) -> dict[str, int]:
    return {os.path.basename(p): torch.load(p, weights_only=True)["global_step"]
            for p in glob.glob(os.path.join(folder, "ckpt", "*.ckpt"))}


def advised(message: str) -> list[str]:
    command = message[message.index("lightning-mamba fit "):].split(";")[0]
    argv = shlex.split(command)
    assert argv[:2] == ["lightning-mamba", "fit"]
    return argv[1:]


def test_diverged_first_step_leaves_no_checkpoint_and_a_command_to_start_again(tmp_path, corpus, cache_dir):
    """lr 1e30: step 0's update gives finite weights (~1e29) whose loss is NaN at step 1; their checkpoints go."""
    message = fails(["fit", "--config", config(tmp_path, corpus, cache_dir), "--model.lr", "1e30"])
    assert message.startswith("error: non-finite values at global step 1 ")
    assert checkpoints(tmp_path) == {}  # before: last.ckpt and epoch=0-step=1.ckpt held the diverged weights
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["epoch=0-step=1.ckpt.nonfinite", "last.ckpt.nonfinite"]
    assert "no checkpoint of good weights is left: start again with a lower lr" in message
    argv = advised(message)
    assert "--ckpt_path" not in argv and argv[argv.index("--model.lr") + 1] == "1e+29"
    assert os.path.isfile(argv[argv.index("--config") + 1])  # the run's own config.yaml
    argv[argv.index("--model.lr") + 1] = "1e-3"  # 1e29 diverges as well: the command is what is checked here
    main(argv)
    assert checkpoints(tmp_path)["last.ckpt"] == 8


def test_stop_then_the_advised_command_resumes_from_the_last_good_checkpoint_at_the_lower_lr(tmp_path, corpus,
                                                                                              cache_dir):
    cfg = config(tmp_path, corpus, cache_dir, keep_all=True, warmup_steps=6)
    message = fails(["fit", "--config", cfg, "--model.lr", "100"])  # diverges at step 4
    assert message.startswith("error: non-finite values at global step 4 ")
    assert "put aside epoch=0-step=4.ckpt, last.ckpt (*.nonfinite: the weights that failed)" in message
    assert checkpoints(tmp_path) == {f"epoch=0-step={s}.ckpt": s for s in (1, 2, 3)}
    argv = advised(message)
    good = argv[argv.index("--ckpt_path") + 1]
    assert good == str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt") and argv[argv.index("--model.lr") + 1] == "10"
    argv[argv.index("--model.lr") + 1] = "1e-3"  # low enough to finish
    main(argv)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8
    # the lr typed replaced the checkpoint's 100 in the model, the optimizer and the schedule
    assert last["hyper_parameters"]["lr"] == 1e-3
    assert last["lr_schedulers"][0]["base_lrs"] == [1e-3, 1e-3]
    assert all(t.isfinite().all() for t in last["state_dict"].values())
    step4 = torch.load(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weights_only=True)
    assert [g["lr"] for g in step4["optimizer_states"][0]["param_groups"]] == pytest.approx([1e-3 * 5 / 6] * 2)


def test_typed_lr_on_resume_keeps_the_groups_ratios(tmp_path, corpus, cache_dir):
    cfg = config(tmp_path, corpus, cache_dir, steps=4, keep_all=True, a_lr_mult=10.0)
    main(["fit", "--config", cfg])
    main(["fit", "--config", cfg, "--ckpt_path", str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"), "--trainer.max_steps",
          "3", "--model.lr=1e-4"])
    after = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert after["global_step"] == 3 and after["hyper_parameters"]["lr"] == 1e-4
    assert after["lr_schedulers"][0]["base_lrs"] == pytest.approx([1e-4, 1e-4, 1e-3])


def test_lr_from_a_config_does_not_replace_the_checkpoints(tmp_path, corpus, cache_dir):
    """Only a --model.lr typed on the command line wins; settings from config files are the checkpoint's (as before)."""
    main(["fit", "--config", config(tmp_path, corpus, cache_dir, steps=2)])
    other = config(tmp_path / "other", corpus, cache_dir, steps=3, lr=1e-4)
    main(["fit", "--config", other, "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")])
    assert torch.load(tmp_path / "other" / "ckpt" / "last.ckpt", weights_only=True)["hyper_parameters"]["lr"] == 2e-3


def test_skip_run_that_ends_in_skipped_steps_is_an_error(tmp_path, corpus, cache_dir):
    """on_nonfinite=skip with diverged weights: every later step is skipped; the run used to finish with exit 0."""
    message = fails(["fit", "--config", config(tmp_path, corpus, cache_dir, steps=6), "--model.lr", "1e30",
                     "--nan_guard.on_nonfinite", "skip"])
    assert message.startswith("error: the run ended with its last 5 steps (from global step 1) skipped, the loss of "
                              "its weights non-finite: they are broken: put aside ")
    assert checkpoints(tmp_path) == {}
    assert "no checkpoint of good weights is left: start again with a lower lr: lightning-mamba fit" in message


def test_skip_run_that_ends_in_a_skipped_bad_gradient_finishes(tmp_path, corpus, cache_dir):
    """An infinite gradient with a finite loss at the last step: a bad batch, not broken weights; the run ends well."""
    path = config(tmp_path, corpus, cache_dir, steps=4)
    main(["fit", "--config", path, "--nan_guard.on_nonfinite", "skip", "--trainer.callbacks+=tests.robust.helpers."
          "InfiniteGradient", "--trainer.callbacks.step", "3", "--trainer.callbacks.name",
          "model.backbone.layers.0.mixer.in_proj.weight"])
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4 and last["callbacks"]["NanGuard"] == {"skipped": 1}
