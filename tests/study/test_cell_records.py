"""The study's summary writes each cell's own records: the loss against position at its evaluations along training
(along_training.png) and its heads' decays along training (decays.csv, and in summary.json's history of each
evaluation), from a real micro sweep on the CPU."""

import csv
import json

import numpy as np
import pytest

from lightning_mamba.commands import sweep as cmd
from lightning_mamba.study.cell_records import evaluation_steps

from ..micro_study import micro_args


def test_evaluation_steps_spread_over_training_with_first_and_last():
    assert evaluation_steps([500, 1000]) == [500, 1000]
    picks = evaluation_steps(list(range(500, 6001, 500)) + [6007])
    assert len(picks) == 4 and picks[0] == 500 and picks[-1] == 6007


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_a_sweep_writes_each_cells_curves_along_training_and_decays(tmp_path, corpus):
    callbacks = [
        {"class_path": "lightning_mamba.callbacks.LengthGeneralizationCallback",
         "init_args": {"every_n_validations": 1, "multiples": [1, 2, 4], "n_rows": 2}},
        {"class_path": "lightning_mamba.callbacks.DecayDynamicsCallback",
         "init_args": {"every_n_steps": 2, "probe_rows": 1, "histograms": False}},
    ]
    trainer = {"val_check_interval": 4, "limit_val_batches": 2, "enable_progress_bar": False,
               "enable_model_summary": False, "callbacks": callbacks}
    out = tmp_path / "study"
    assert cmd.main(micro_args(tmp_path, corpus, out, "--states", "[8]", "--lens", "[32]", "--tokens_per_cell", "2048",
                               "--trainer_overrides", json.dumps(trainer))) == 0  # 8 steps: evaluated at 4 and 8
    cell = out / "cells" / "state8_len32"
    assert (cell / "along_training.png").stat().st_size > 0
    with open(cell / "decays.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 6, 8]
    record = json.loads((cell / "dynamics" / "step_8.json").read_text())
    alpha = np.concatenate([np.asarray(layer) for layer in record["alpha_T"]])
    assert float(rows[-1]["alpha_T_max"]) == pytest.approx(alpha.max(), abs=1e-5)
    assert int(rows[-1]["heads_alpha_T_above"]) == int((alpha > 0.99).sum())
    # and each evaluation along training in summary.json carries the decays of the same step
    history = json.loads((out / "summary.json").read_text())["onset"]["cells"]["state8_len32"]["history"]
    assert [h["step"] for h in history] == [4, 8]
    assert history[-1]["decay_alpha_T_max"] == pytest.approx(alpha.max())
    assert history[-1]["decay_heads_alpha_T_above"] == int((alpha > 0.99).sum())
    assert (out / "decays.png").stat().st_size > 0  # the slowest head along training, every cell


def test_no_decay_records_no_decays_figure():
    from lightning_mamba.study.summary_plots import plot_decays

    assert plot_decays({"cells": {"c": {"history": [{"step": 4, "forgets": True, "ratio_16_64x": 1.0}]}}}) is None
