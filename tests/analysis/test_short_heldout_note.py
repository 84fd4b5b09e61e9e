"""A held-out split too short for the evaluation says what to change, with the numbers: more held-out tokens (and
how many), a shorter evaluation (how long at most) or fewer rows (how many), in each place they are set."""

import numpy as np

from lightning_mamba.analysis.evaluator import eval_rows


def test_the_default_evaluation_at_len_2048_says_what_to_change():
    """configs/train.yaml at LEN 2048: 4 rows of 16 x 2048 + 1 tokens, and a split that holds 3 of them."""
    length, stream = 16 * 2048 + 1, np.zeros(100_000, dtype=np.int64)
    rows, info = eval_rows(stream, length, 4)
    note = info["note"]
    assert rows.shape == (3, length) and note.startswith("only 3 of 4 rows of 32769 tokens fit")
    assert "at least 131076 held-out tokens (1.31x as many" in note and "data.val_fraction" in note
    assert "--text" in note
    assert "at most 24999 positions per row" in note and "--length" in note and "max_eval_tokens" in note
    assert "ask for 3 rows" in note and "--n_rows" in note and "eval_n_rows" in note and "n_rows" in note
    assert "rest on 3 rows" in note and "\n" not in note
    # each remedy, taken, gives all the rows
    assert eval_rows(np.zeros(131076, dtype=np.int64), length, 4)[1]["note"] == ""
    assert eval_rows(stream, 24999 + 1, 4)[1]["note"] == ""
    assert eval_rows(stream, length, 3)[1]["note"] == ""
