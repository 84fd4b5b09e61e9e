"""A negative trainer.gradient_clip_val would flip every gradient (the loss climbs and the run exits 0): refused
with one line at the first step, before the optimizer changes anything."""

import glob
import os

import pytest

from lightning_mamba.cli import main

from .conftest import run_config


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_negative_gradient_clip_val_is_refused(tmp_path, corpus, cache_dir, capsys, algorithm):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", run_config(tmp_path, corpus, cache_dir, 2), "--trainer.gradient_clip_val", "-1",
              "--trainer.gradient_clip_algorithm", algorithm])
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    assert e.value.code.startswith("error: trainer.gradient_clip_val must be >= 0 (got -1")
    assert "0 or null turns clipping off" in e.value.code
    assert not glob.glob(os.path.join(tmp_path, "ckpt", "*.ckpt"))  # no step was taken


@pytest.mark.parametrize("value", ["0", "null", "1.0"])
def test_zero_null_and_positive_clip_train(tmp_path, corpus, cache_dir, value):
    main(["fit", "--config", run_config(tmp_path, corpus, cache_dir, 1), "--trainer.gradient_clip_val", value])
    assert os.path.isfile(os.path.join(tmp_path, "ckpt", "last.ckpt"))
