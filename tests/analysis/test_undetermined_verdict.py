"""An undetermined verdict (a non-finite loss: forgets None) in words and scalars: "undetermined", never a 1/0."""

import numpy as np

from lightning_mamba.analysis.criterion import judge_forgetting, verdict_word
from lightning_mamba.analysis.forgetting import forgetting_report

T = 16


def nan_losses(rows=2, n=8 * T):
    losses = np.full((rows, n), 3.0)
    losses[:, 3 * T:] = np.nan  # diverged past 3T
    return losses


def test_verdict_word_names_the_three_verdicts():
    positions = np.arange(1, 17) * 8
    undetermined = judge_forgetting(positions, np.full(16, np.nan), 32, bucket=8).to_dict()
    assert verdict_word(undetermined) == "undetermined"
    assert verdict_word(undetermined, reason="short") == "undetermined (the loss is not finite)"
    assert verdict_word(undetermined, reason=True).startswith("undetermined (the loss is not finite (nan in the bucket")
    assert verdict_word({"forgets": None}, reason=True) == "undetermined"  # no reason recorded
    assert verdict_word({"forgets": True}) == "forgets" and verdict_word({"forgets": False}) == "FAILS to forget"


def test_an_undetermined_report_has_no_forgets_or_blowup_scalar():
    """forgets was NaN and blowup_position -1 ("no blow-up"); the analyze command logged that -1 to TensorBoard."""
    report = forgetting_report(nan_losses(), T)
    assert report.verdict.forgets is None
    scalars = report.scalars("lengthgen/")
    assert scalars["lengthgen/forgets"] is None and scalars["lengthgen/blowup_position"] is None
    fine = forgetting_report(np.full((2, 8 * T), 3.0), T).scalars("lengthgen/")
    assert fine["lengthgen/forgets"] == 1.0 and fine["lengthgen/blowup_position"] == -1


def test_analyze_prints_no_nan_ratio_for_an_undetermined_verdict():
    from lightning_mamba.commands.analyze import summary_lines

    report = forgetting_report(nan_losses(n=64 * T), T)
    r = {"seq_len": T, "ckpt": "x.ckpt", "state_size": 1e6, "rows": {"rows": 2}, "length": 64 * T,
         "dtype": "float32", "verdict": report.verdict.to_dict(), "bucket": report.bucket, "state": {}, "out": "o"}
    text = "\n".join(summary_lines(r))
    assert "verdict: undetermined: the loss is not finite" in text
    assert "ratio mean[4T,16T] / mean[T/2,T]: n/a (the loss is not finite)" in text  # not "needs --length"
    assert "ratio mean[16T,64T] / mean[T/2,T]: n/a (the loss is not finite)" in text
    assert all("nan" not in line for line in text.splitlines() if line.startswith("ratio"))
