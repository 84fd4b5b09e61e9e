"""Evaluating with mitigations, the settings search, and `analyze --rri/--window/--state_norm`."""

import json

import pytest
import torch

from lightning_mamba.analysis.evaluator import token_losses, window_mean
from lightning_mamba.commands import analyze as cmd, common
from lightning_mamba.data import ByteTokenizer
from lightning_mamba.mitigations.search import evaluate_with, search_dt_scale, search_rri, search_window
from tests.tiny import tiny_lm

T = 8  # T_train of the searches


@pytest.fixture
def rows():
    torch.manual_seed(0)
    return torch.randint(0, 64, (2, 4 * T + 1))


def test_evaluate_with_nothing_is_token_losses(lm, rows):
    torch.testing.assert_close(evaluate_with(lm, rows, T, piece_len=16), token_losses(lm, rows, 16), rtol=0, atol=0)
    rri = evaluate_with(lm, rows, T, piece_len=16, rri=(0.9, 0.5))
    assert rri.shape == (2, 4 * T) and not torch.equal(rri, token_losses(lm, rows, 16))
    calibrated = evaluate_with(lm, rows, T, piece_len=4, state_norm="calibrate")
    assert torch.isfinite(calibrated).all()
    assert all(m.intervention is None and m.state_hook is None for m in lm.mixers)


def test_search_returns_the_grid_minimum(lm, rows):
    result = search_rri(lm, rows, T, m_alphas=[1.0, 0.9], m_bs=[1.0, 0.5], piece_len=16)
    assert len(result.table) == 4
    for row in result.table:  # each score is the loss over (2T, 4T] with that setting
        expected = window_mean(evaluate_with(lm, rows, T, piece_len=16, rri=row["rri"]), 2 * T, 4 * T)
        assert row["loss"] == pytest.approx(expected, rel=1e-6)
    assert result.best["loss"] == min(row["loss"] for row in result.table)
    assert search_window(lm, rows, T, [2, 5], piece_len=16).best["window"] in (2, 5)
    dt = search_dt_scale(lm, rows, T, [0.5, 1.0], piece_len=16)
    assert dt.best["loss"] == min(row["loss"] for row in dt.table)
    with pytest.raises(ValueError, match="4 x T_train"):
        search_rri(lm, rows[:, :20], T, [1.0], [1.0])


@pytest.fixture
def stubbed(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "load_checkpoint", lambda path, backend: (tiny_lm(vocab_size=257), {"seq_len": 16}))
    monkeypatch.setattr(common, "load_tokenizer", lambda name, meta: ByteTokenizer())
    ckpt = tmp_path / "run" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    text = tmp_path / "held_out.txt"
    text.write_text("Now is the winter of our discontent.\n" * 5)
    return ckpt, text


FAST = ["--length", "64", "--probes", "[text]", "--n_rows", "1"]


def test_analyze_with_rri_says_so(stubbed, capsys):
    ckpt, text = stubbed
    assert cmd.main(["--ckpt", str(ckpt), "--text", str(text), "--rri", "0.9999,0.75", *FAST]) == 0
    out = ckpt.parent / "analysis-rri0.9999_0.75"
    assert "intervention: rri0.9999_0.75" in capsys.readouterr().out
    r = json.loads((out / "verdict.json").read_text())
    assert r["intervention"]["rri"] == [0.9999, 0.75] and r["out"] == str(out)
    assert not (ckpt.parent / "analysis").exists()  # the plain analysis is never overwritten


def test_analyze_window_and_state_norm(stubbed, capsys):
    ckpt, text = stubbed
    assert cmd.main(["--ckpt", str(ckpt), "--text", str(text), "--window", "8", *FAST]) == 0
    assert json.loads((ckpt.parent / "analysis-window8" / "verdict.json").read_text())["intervention"]["window"] == 8
    assert cmd.main(["--ckpt", str(ckpt), "--text", str(text), "--state_norm", "calibrate", "--piece_len", "8", *FAST]) == 0
    verdict = ckpt.parent / "analysis-statenorm" / "verdict.json"
    assert len(json.loads(verdict.read_text())["intervention"]["state_norm_thresholds"]) == 2
    # the recorded thresholds can be reused as a file
    assert cmd.main(["--ckpt", str(ckpt), "--text", str(text), "--state_norm", str(verdict), "--out",
                     str(ckpt.parent / "again"), *FAST]) == 0
    assert cmd.main(["--ckpt", str(ckpt), "--text", str(text), "--rri", "0.9", *FAST]) == 2
    assert "two numbers" in capsys.readouterr().err


def test_the_dt_scale_grid_tries_both_directions():
    from lightning_mamba.mitigations.search import default_grid

    scales = [s["dt_scale"] for s in default_grid("dt_scale", 64) if s]
    assert min(scales) < 1 < max(scales)  # c < 1 is the paper's LongMamba-style baseline, c > 1 forces forgetting
    assert {} in default_grid("dt_scale", 64)


def test_a_best_setting_on_the_grids_edge_gets_a_step_past_it():
    from lightning_mamba.mitigations.search import default_grid, edge_moves

    grid = default_grid("dt_scale", 64)
    assert edge_moves({"dt_scale": 0.25}, grid) == [{"dt_scale": 0.125}]
    assert edge_moves({"dt_scale": 64.0}, grid) == [{"dt_scale": 128.0}]
    assert edge_moves({"dt_scale": 2.0}, grid) == []  # inside the grid: nothing to extend
    assert edge_moves({}, grid) == []  # the model as trained won
    rri = default_grid("rri", 64)
    assert edge_moves({"rri": (0.99, 1.0)}, rri) == [{"rri": (0.98, 1.0)}]
    assert edge_moves({"rri": (0.99, 0.5)}, rri) == [{"rri": (0.98, 0.5)}, {"rri": (0.99, 0.25)}]
    assert edge_moves({"rri": (0.999, 0.75)}, rri) == []
    assert edge_moves({"window": 16}, default_grid("window", 64)) == [{"window": 8}]


def test_the_walk_past_the_edge_stops_where_the_loss_turns_up():
    import math

    from lightning_mamba.mitigations.search import default_grid, extend_past_edges

    def score(settings):  # a loss with its minimum at c = 0.05: below the grid's smallest c (0.25)
        return [{**s, "tag": f"dt{s['dt_scale']}", "loss": (math.log2(s["dt_scale"] / 0.05)) ** 2} for s in settings]

    grid = default_grid("dt_scale", 64)
    first = min(score([g for g in grid if g]), key=lambda r: r["loss"])
    assert first["dt_scale"] == 0.25
    best, added = extend_past_edges(first, grid, score)
    assert [r["dt_scale"] for r in added] == [0.125, 0.0625, 0.03125]  # the third is worse: the walk stops there
    assert best["dt_scale"] == 0.0625
    best, added = extend_past_edges(first, grid, score, max_steps=1)
    assert best["dt_scale"] == 0.125 and len(added) == 1


def test_the_comparison_walks_past_the_grid_to_the_lowest_loss():
    """On these rows the tiny model's loss keeps falling past the dt grid's largest c (64: 4.135 at 4 x T, 4.129 at
    c = 128): the comparison must not stop at the grid's edge."""
    from lightning_mamba.mitigations.search import compare_mitigations
    from tests.tiny import tiny_lm

    model = tiny_lm()
    torch.manual_seed(3)
    rows = torch.randint(0, 64, (2, 8 * 8 + 1))
    _, dt = compare_mitigations(model, rows, 8, bucket=4, methods=("dt_scale",), piece_len=16)
    past = [r for r in dt["search"] if r.get("past_grid_edge")]
    assert past, dt["search"]
    chosen = [r for r in dt["search"] if r["setting"] == dt["setting"]]
    assert chosen and chosen[0]["loss"] == min(r["loss"] for r in dt["search"])
    assert chosen[0].get("past_grid_edge")  # the grid's own best (an edge) was beaten by a step past it
