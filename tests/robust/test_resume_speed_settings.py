"""A resume may change the scan's speed-only settings (chunk_size, quadratic_max_len) when they are typed: the
weights and results are the same, and a study cell can go on with a faster scan. Untyped, the checkpoint's stay."""

import warnings

import torch

from lightning_mamba.cli import main

from .conftest import run_config


def test_typed_speed_settings_win_over_the_checkpoints_on_resume(tmp_path, corpus, cache_dir):
    main(["fit", "--config", run_config(tmp_path, corpus, cache_dir, 2)])
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=False)["hyper_parameters"]["quadratic_max_len"] == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", "--config", run_config(tmp_path, corpus, cache_dir, 4), "--ckpt_path", str(last),
              "--model.quadratic_max_len", "64", "--model.chunk_size", "8"])
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == 4
    assert (saved["hyper_parameters"]["quadratic_max_len"], saved["hyper_parameters"]["chunk_size"]) == (64, 8)
    replaced = [str(w.message) for w in caught if "model settings replace" in str(w.message)]
    assert not any("quadratic_max_len" in m or "chunk_size" in m for m in replaced)  # typed: not replaced
    main(["fit", "--config", run_config(tmp_path, corpus, cache_dir, 6), "--ckpt_path", str(last)])
    assert torch.load(last, weights_only=False)["hyper_parameters"]["quadratic_max_len"] == 64  # untyped: kept
