"""LengthGeneralizationCallback(min_length): a floor, in tokens, on how far it evaluates; the verdict and ratio_far
cover the whole evaluated range (a model that rises slowly can pass at 64 x T and fail further out)."""

import json
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_mamba.analysis import forgetting
from lightning_mamba.analysis.evaluator import read_position_losses_csv
from lightning_mamba.analysis.forgetting import forgetting_report
from lightning_mamba.analysis.plots import plot_forgetting_report
from lightning_mamba.callbacks import LengthGeneralizationCallback
from tests.tiny import tiny_lm

T = 16  # 64 x T = 1024 positions


def test_the_floor_sets_how_far_to_evaluate():
    floor = LengthGeneralizationCallback(min_length=32768)  # multiples 1..64
    assert [floor.eval_length(t) for t in (32, 512, 1024)] == [32768, 32768, 65536]  # 64 x T when further
    assert LengthGeneralizationCallback().eval_length(32) == 2048
    assert LengthGeneralizationCallback(min_length=3000).eval_length(T) == 3000  # need not be a whole number of T
    capped = LengthGeneralizationCallback(min_length=3000, max_eval_tokens=4096)
    assert capped.eval_length(T) == 3000 and capped.eval_length(128) == 4096


@pytest.mark.parametrize("bad", [0, -5, 1.5, "32K", True])
def test_a_floor_that_is_not_a_positive_int_is_refused(bad):
    with pytest.raises(ValueError, match="min_length must be a positive number of tokens"):
        LengthGeneralizationCallback(min_length=bad)


def test_a_floor_above_the_cap_is_refused():
    with pytest.raises(ValueError, match="min_length=8192 is above max_eval_tokens=4096"):
        LengthGeneralizationCallback(min_length=8192, max_eval_tokens=4096)


def test_ratio_far_is_the_last_quarter_over_the_in_window_reference():
    losses = torch.ones(4, 4096, dtype=torch.float64)
    losses[:, 3072:] = 3.0
    losses[0, 3072:] = 2.0  # rows differ: the interval has a width
    assert forgetting.far_window(4096) == (3072, 4096)
    r = forgetting.far_ratio(losses, T, "lengthgen/")
    assert r["lengthgen/ratio_far"] == pytest.approx(2.75)
    assert r["lengthgen/ratio_far_lo"] < 2.75 < r["lengthgen/ratio_far_hi"]
    assert set(forgetting.far_ratio(torch.ones(2, 8), T).values()) == {None}  # rows end before T: no reference


def fixture_run(tmp_path, stream_tokens: int):
    """A Trainer with a TensorBoard logger (not fitted: the callback is called directly), a data module's stand-in
    whose held-out stream has ``stream_tokens`` tokens, and the tiny LM."""
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=TensorBoardLogger(tmp_path, name="run"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    stream = np.random.default_rng(0).integers(0, 64, stream_tokens)
    data = SimpleNamespace(hparams=SimpleNamespace(seq_len=T), val_tokens=lambda: stream,
                           tokenizer=SimpleNamespace(eos_id=0))
    return trainer, data, tiny_lm(vocab_size=64)


def record(tmp_path, step=0) -> dict:
    return json.loads((tmp_path / "run" / "version_0" / "lengthgen" / f"step_{step}.json").read_text())


def per_position(tmp_path, r: dict) -> np.ndarray:
    return read_position_losses_csv(str(tmp_path / "run" / "version_0" / "lengthgen" / r["per_position_csv"]))


@pytest.mark.parametrize("stream_tokens, rows, repeated", [(1500, 1, 1), (700, 1, 2)])
def test_a_floor_past_64t_on_a_tiny_held_out_split(tmp_path, stream_tokens, rows, repeated):
    """The existing row rule holds at the floor: rows are consecutive windows of the held-out stream; when fewer
    than n_rows fit, fewer are averaged, and a stream shorter than one row is repeated; both are said (a warning,
    and step_N.json's rows)."""
    trainer, data, model = fixture_run(tmp_path, stream_tokens)
    cb = LengthGeneralizationCallback(n_rows=2, piece_len=512, min_length=1200)  # 64 x T = 1024 < 1200
    with pytest.warns(UserWarning, match="only 1 of 2 rows" if repeated == 1 else "repeated it 2 times"):
        cb.analyze(trainer, model, data, 0)
    r = record(tmp_path)
    curve = per_position(tmp_path, r)
    assert r["verdict"]["evaluated_to"] == 1200 == len(curve)
    assert r["rows"]["rows"] == rows and r["rows"]["repeated"] == repeated and r["rows"]["note"]
    assert np.isfinite(curve).all() and r["far_window"] == [900, 1200]
    m = r["metrics"]
    assert m["lengthgen/ratio_far"] > 0 and m["lengthgen/ratio_16_64x"] > 0  # the ratio keeps its [16T, 64T]
    assert set(m) >= {"lengthgen/loss@64x", "lengthgen/ratio_far_lo", "lengthgen/ratio_far_hi"}


def rising_far_out(model, rows, *args):
    """Stands in for token_losses: a flat loss of 1 to position 2000 (past 64 x T = 1024), 3 beyond it."""
    losses = torch.ones(rows.size(0), rows.size(1) - 1)
    losses[:, 2000:] = 3.0
    return losses


@pytest.mark.parametrize("min_length", [None, 4096])
def test_the_verdict_covers_the_evaluated_range(tmp_path, monkeypatch, min_length):
    """A loss that crosses 2x only past 64 x T passes at 64 x T and fails with the floor; ratio_16_64x does not see
    it, ratio_far does; both reach TensorBoard and step_N.json."""
    monkeypatch.setattr(forgetting, "token_losses", rising_far_out)
    trainer, data, model = fixture_run(tmp_path, 10000)
    cb = LengthGeneralizationCallback(n_rows=2, min_length=min_length)
    cb.analyze(trainer, model, data, 0)
    cb.flush_figures()  # drawn in the figure process: written once done
    r = record(tmp_path)
    v, m = r["verdict"], r["metrics"]
    assert v["ratio_16_64x"] == pytest.approx(1.0)
    if min_length is None:
        assert v["evaluated_to"] == 1024 and v["forgets"] and m["lengthgen/ratio_far"] == pytest.approx(1.0)
    else:
        assert v["evaluated_to"] == 4096 and r["far_window"] == [3072, 4096]
        assert v["forgets"] is False and v["blowup_position"] == 2008  # the first bucket (of 8) past 2000
        assert m["lengthgen/ratio_far"] == pytest.approx(3.0) and m["lengthgen/blowup_position"] == 2008
        assert cb.summary_line().startswith("forgetting:      FAILS to forget (blow-up at position 2008")
    acc = EventAccumulator(trainer.loggers[0].log_dir, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert {"lengthgen/ratio_far", "lengthgen/ratio_far_lo", "lengthgen/ratio_far_hi"} <= set(acc.Tags()["scalars"])
    assert "lengthgen/loss_vs_position" in acc.Tags()["images"]


def test_a_long_curve_is_drawn_thin_with_a_log_binned_mean():
    """32K positions in buckets of 16 (T = 32): the buckets are drawn as a thin line, a binned mean over them."""
    losses = 1.0 + torch.rand(2, 32768, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    report = forgetting_report(losses, 32)
    assert report.curve.size == 2048
    fig = plot_forgetting_report(report, 2.0, "long")
    ax = fig.axes[0]
    assert ax.lines[0].get_marker() in ("", "None")
    binned = [line for line in ax.lines if line.get_label() == "mean over log-spaced bins"]
    assert binned and 20 < len(binned[0].get_xdata()) <= 48 and np.isfinite(binned[0].get_ydata()).all()
    short = plot_forgetting_report(forgetting_report(losses[:, :2048], 32), 2.0, "short").axes[0]  # 128 buckets
    assert short.lines[0].get_marker() == "." and "mean over log-spaced bins" not in [
        line.get_label() for line in short.lines]


def test_the_callbacks_chunk_runs_the_scan_and_bad_settings_are_refused_when_built(tmp_path):
    trainer, data, model = fixture_run(tmp_path, 3000)
    seen = []
    hook = model.mixers[0].register_forward_pre_hook(lambda m, args: seen.append(m.chunk_size))
    LengthGeneralizationCallback(n_rows=1, piece_len=512, chunk_size=64).analyze(trainer, model, data, 0)
    hook.remove()
    assert set(seen) == {64} and model.mixers[0].chunk_size == 16  # the evaluation's chunk, then the model's
    assert record(tmp_path)["verdict"]["evaluated_to"] == 1024
    for bad in (0, 2.5, "64"):
        with pytest.raises(ValueError, match="chunk_size must be a whole number >= 1, 'auto', or None"):
            LengthGeneralizationCallback(chunk_size=bad)
    LengthGeneralizationCallback(chunk_size="auto")  # the model's on this CPU (evaluation_chunk's own test)
    with pytest.raises(ValueError, match="dtype='fp8' is unknown: use float32 .* tf32"):
        LengthGeneralizationCallback(dtype="fp8")
