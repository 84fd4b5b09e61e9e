"""`lightning-mamba mitigate`: every fix at its searched setting, the model as trained and other checkpoints, on
the same held-out rows; the searched setting is the table's best and never worse than the model as trained."""

import json

import pytest

from lightning_mamba.commands import mitigate as cmd


def run_args(path, text, out, *extra):
    return ["--ckpt", str(path), "--seq_len", "16", "--text", str(text), "--length", "256", "--n_rows", "2",
            "--out", str(out), *extra]


def test_mitigate_compares_every_fix_on_the_same_rows(checkpoint, tmp_path, capsys):
    path, text = checkpoint
    out = tmp_path / "out"
    assert cmd.main(run_args(path, text, out, "--compare", json.dumps({"same weights": str(path)}))) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "| RRI |" in printed and "| sliding window |" in printed
    progress = captured.err.splitlines()  # one line per setting evaluated, on stderr
    assert any(line.startswith("mitigate: rri: setting 1/") and "loss@4x" in line for line in progress)
    assert any(line.startswith("mitigate: window: setting ") for line in progress)
    assert any(line.startswith("mitigate: state norm: statenorm: ") for line in progress)
    r = json.loads((out / "mitigation.json").read_text())
    by = {e["name"]: e for e in r["entries"]}
    assert list(by) == ["as trained", "RRI", "dt scaling", "sliding window", "state norm", "same weights"]
    assert by["same weights"]["metrics"] == by["as trained"]["metrics"]  # same weights, same rows: same numbers
    base = by["as trained"]["metrics"]["loss@4x"]
    for name in ("RRI", "dt scaling", "sliding window"):
        e = by[name]
        best = min(e["search"], key=lambda row: row["loss"])
        assert e["setting"] == best["setting"]
        # the search scores exactly the evaluation's loss@4x (causal model, same rows), and "none" is a candidate
        assert e["metrics"]["loss@4x"] == pytest.approx(best["loss"], rel=1e-6)
        assert e["metrics"]["loss@4x"] <= base + 1e-9
        assert any(row["setting"] == "none" for row in e["search"])
    assert by["state norm"]["setting"] == "statenorm"
    assert len(by["as trained"]["curve"]) == len(by["as trained"]["positions"]) > 0
    assert (out / "loss_vs_position.png").stat().st_size > 0
    assert (out / "mitigation.md").read_text().startswith("| model |")


def test_mitigate_bad_inputs_are_one_line_errors(checkpoint, tmp_path, capsys):
    path, text = checkpoint
    assert cmd.main(run_args(path, text, tmp_path / "a", "--length", "32")) == 2  # below the search's 4 x T
    assert cmd.main(run_args(path, text, tmp_path / "b", "--compare", '{"x": "/no/such/ckpt"}')) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("mitigate: error:") for line in err)
    assert "4 x T_train" in err[0] and "/no/such/ckpt" in err[1]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    (tmp_path / "empty").mkdir()  # a directory that is no checkpoint: the line names the flag and the row
    assert cmd.main(run_args(path, text, tmp_path / "c", "--compare", json.dumps({"x": str(tmp_path / "empty")}))) == 2
    assert capsys.readouterr().err.strip().startswith("mitigate: error: --compare x: ")


def test_the_table_names_where_the_search_scored(checkpoint, tmp_path, capsys):
    """--at_multiple 8: the table's header and the progress lines say 8 x T (they once said 4 x T whatever was asked)."""
    path, text = checkpoint
    out = tmp_path / "out"
    assert cmd.main(run_args(path, text, out, "--methods", "[rri]", "--at_multiple", "8")) == 0
    captured = capsys.readouterr()
    assert "| model | setting (searched by loss at 8 x T) |" in captured.out
    assert (out / "mitigation.md").read_text().startswith("| model | setting (searched by loss at 8 x T) |")
    assert any("loss@8x" in line for line in captured.err.splitlines())


def test_a_compared_checkpoint_with_a_smaller_embedding_is_refused_before_the_search(checkpoint, tmp_path, capsys,
                                                                                     monkeypatch):
    """--compare of a directory that records no tokenizer (an official or hand-made one) whose embedding holds fewer
    ids than --ckpt's tokenizer: one line before the search (it was an IndexError traceback at its evaluation, after
    the whole search had run)."""
    from lightning_mamba.models.checkpoint import save_pretrained
    from tests.tiny import tiny_lm

    path, text = checkpoint
    small = tmp_path / "small"
    save_pretrained(tiny_lm(vocab_size=64), str(small))  # no tokenizer recorded
    searched = []
    monkeypatch.setattr(cmd, "compare_mitigations", lambda *a, **k: searched.append(1) or [])
    assert cmd.main(run_args(path, text, tmp_path / "out", "--compare", json.dumps({"small": str(small)}))) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and searched == []
    assert err.strip().splitlines()[-1] == (f"mitigate: error: --compare small: {small} has an embedding of 64 ids, "
                                            "fewer than the tokenizer of --ckpt (257): compare checkpoints trained "
                                            "with the same tokenizer")
    assert not (tmp_path / "out").exists()


def test_ctrl_c_is_one_line_and_exit_130(checkpoint, tmp_path, capsys, monkeypatch):
    """Ctrl-C mid-search (KeyboardInterrupt wherever it lands): one line and exit status 130, nothing written; it was
    a traceback through the scan it hit."""
    path, text = checkpoint

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cmd, "compare_mitigations", interrupted)
    assert cmd.main(run_args(path, text, tmp_path / "out")) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("mitigate: error: stopped by Ctrl-C (files already written are kept; none "
                                            "is half-written)")
    assert "Traceback" not in err and not (tmp_path / "out").exists()
