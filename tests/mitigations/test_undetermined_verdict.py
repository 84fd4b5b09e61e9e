"""The mitigation comparison on a diverged model (NaN weights): its log and table say "undetermined", not
"FAILS to forget", and the table shows no "nan"."""

import torch

from lightning_mamba.mitigations.search import compare_mitigations, markdown_table
from tests.tiny import tiny_lm

T = 8


def test_a_diverged_model_is_undetermined_in_the_log_and_the_table():
    model = tiny_lm()
    with torch.no_grad():
        model.backbone.embedding.weight.fill_(float("nan"))
    torch.manual_seed(0)
    rows = torch.randint(0, 64, (2, 4 * T + 1))
    messages = []
    entries = compare_mitigations(model, rows, T, bucket=4, methods=(), piece_len=16, log=messages.append)
    (entry,) = entries
    assert entry["metrics"]["forgets"] is None and "not finite" in entry["metrics"]["undetermined"]
    (line,) = [m for m in messages if m.startswith("as trained: none: ")]
    assert line.startswith("as trained: none: undetermined (the loss is not finite (") and "FAILS" not in line
    table = markdown_table(entries, T)
    assert table[-1].endswith("| - | - | - | - | undetermined (the loss is not finite) |"), table[-1]
    assert "nan" not in "\n".join(table) and "FAILS" not in "\n".join(table)


def test_the_table_still_reads_verdicts_without_a_reason():
    """A mitigation.json written before the undetermined reason was recorded has only forgets."""
    m = {"loss_in_window": 3.0, "loss@4x": 3.5, "loss_beyond_4x": 4.0, "ratio": 1.333, "blowup_position": 24}
    entries = [{"name": "a", "setting": "none", "metrics": {**m, "forgets": False}},
               {"name": "b", "setting": "none", "metrics": {**m, "forgets": True, "blowup_position": None}},
               {"name": "c", "setting": "none", "metrics": {**m, "forgets": None, "blowup_position": None}}]
    table = markdown_table(entries, T)
    assert table[2].endswith("| FAILS to forget, blow-up at 24 (3.0 T) |")
    assert table[3].endswith("| forgets |") and table[4].endswith("| undetermined |")
