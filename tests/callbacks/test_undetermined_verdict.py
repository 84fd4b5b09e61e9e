"""The length-generalization callback on a diverged model (NaN weights): the verdict is undetermined, so its plot
says so, and neither lengthgen/forgets nor lengthgen/blowup_position is logged (no 0/1, no -1 "no blow-up")."""

import json
from types import SimpleNamespace

import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_mamba.analysis import plots
from lightning_mamba.callbacks import LengthGeneralizationCallback
from tests.tiny import tiny_lm

T = 16


class RecordingLogger:
    def __init__(self, folder):
        self.log_dir, self.metrics = str(folder), {}

    def log_metrics(self, metrics, step):
        self.metrics.update(metrics)


def test_lengthgen_on_a_diverged_model_is_undetermined(tmp_path, monkeypatch):
    model = tiny_lm()
    with torch.no_grad():
        model.backbone.embedding.weight.fill_(float("nan"))
    titles = []
    plot = plots.plot_loss_curve

    def recording_plot(*args, title="", **kw):
        titles.append(title)
        return plot(*args, title=title, **kw)

    monkeypatch.setattr(plots, "plot_loss_curve", recording_plot)
    logger = RecordingLogger(tmp_path)
    trainer = SimpleNamespace(loggers=[logger, TensorBoardLogger(tmp_path / "tb")], default_root_dir=str(tmp_path))
    data = SimpleNamespace(hparams=SimpleNamespace(seq_len=T), val_tokens=lambda: torch.randint(0, 64, (4 * T * 2 + 2,)),
                           tokenizer=SimpleNamespace(eos_id=None))
    callback = LengthGeneralizationCallback(multiples=(1, 2, 4), n_rows=2, piece_len=32)
    callback._figures.in_process = True  # the recording plot is this process's: draw here
    callback.analyze(trainer, model, data, step=7)

    assert titles == ["step 7: undetermined (the loss is not finite)"]  # was "FAILS to forget, blow-up at None"
    assert "lengthgen/forgets" not in logger.metrics and "lengthgen/blowup_position" not in logger.metrics
    assert "lengthgen/forgets" not in callback._published
    assert callback.summary_line().startswith("forgetting:      undetermined (the loss is not finite")
    record = json.loads((tmp_path / "lengthgen" / "step_7.json").read_text())
    assert record["verdict"]["forgets"] is None and record["metrics"]["lengthgen/forgets"] is None
