"""Nonsense settings of analyze, mitigate, passkey and export are refused with one line that names the flag and what
to give, before the checkpoint is loaded (load_checkpoint / load_model are watched: they run as they are, and the
test fails if they were reached)."""

import pytest

from lightning_mamba.commands import analyze, common, export, mitigate, passkey

COMMANDS = {"analyze": analyze, "mitigate": mitigate, "passkey": passkey, "export": export}


@pytest.fixture
def no_loading(monkeypatch):
    """The loaders, watched: each call is recorded, then runs as it is; the test ends with none made."""
    loads = []

    def watched(module, name):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: loads.append(name) or real(*a, **k))

    watched(common, "load_checkpoint")
    watched(export, "load_model")
    yield
    assert loads == [], "the checkpoint was loaded before the arguments were checked"


def error_line(capsys, command: str, argv: list[str]) -> str:
    assert COMMANDS[command].main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    line = err.strip()
    assert line.startswith(f"{command}: error: ")
    return line[len(f"{command}: error: "):]


F = "{file}"  # an existing file
CASES = [  # (id, command, arguments after --ckpt, the message's start)
    ("analyze-threshold-negative", "analyze", ["--threshold", "-1"], "--threshold must be a finite number > 1 (got "
                                                                      "-1.0): it is a loss ratio"),
    ("analyze-threshold-one", "analyze", ["--threshold", "1"], "--threshold must be a finite number > 1 (got 1.0)"),
    ("analyze-threshold-inf", "analyze", ["--threshold", "1e400"], "--threshold must be a finite number > 1 (got "
                                                                    "inf)"),
    ("analyze-stride", "analyze", ["--stride", "-3"], "--stride must be >= 1 (got -3)"),
    ("analyze-stride-zero", "analyze", ["--stride", "0"], "--stride must be >= 1 (got 0)"),
    ("analyze-rri-growth", "analyze", ["--rri", "1.5,0.5"], "--rri 1.5,0.5: RRI's m_alpha and m_b must be in (0, 1]"),
    ("analyze-rri-negative", "analyze", ["--rri", "0.9,-1"], "--rri 0.9,-1: RRI's m_alpha and m_b must be in (0, 1]"),
    ("analyze-rri-not-a-number", "analyze", ["--rri", "2,x"], "--rri 2,x: RRI takes two numbers m_alpha,m_b (e.g. "
                                                               "0.9999,0.75)"),
    ("analyze-rri-one-number", "analyze", ["--rri", "0.9"], "--rri 0.9: RRI takes two numbers m_alpha,m_b"),
    ("analyze-dt_scale", "analyze", ["--dt_scale", "0"], "--dt_scale must be > 0 (got 0.0)"),
    ("analyze-window", "analyze", ["--window", "0"], "--window must be >= 1 token (got 0)"),
    ("analyze-state_norm-missing", "analyze", ["--state_norm", "foo"], "--state_norm foo is no file: give 'calibrate' "
                                                                       "(the largest state norms within T_train"),
    ("analyze-state_norm-not-json", "analyze", ["--state_norm", F], f"--state_norm {F} is not a thresholds JSON"),
    ("analyze-out-file", "analyze", ["--out", F], f"--out {F} is a file: give a directory path"),
    ("mitigate-at_multiple", "mitigate", ["--at_multiple", "0"], "--at_multiple must be >= 1 (got 0)"),
    ("mitigate-threshold", "mitigate", ["--threshold", "0.5"], "--threshold must be a finite number > 1 (got 0.5)"),
    ("mitigate-compare-as-trained", "mitigate", ["--compare", '{"as trained": "' + F + '"}'],
     "--compare as trained: 'as trained' names one of mitigate's own rows (as trained, RRI, dt scaling, sliding "
     "window, state norm): give the checkpoint another name"),  # the plot kept one of the two curves
    ("mitigate-compare-method-name", "mitigate", ["--compare", '{"RRI": "' + F + '"}'], "--compare RRI: 'RRI' names "
                                                                                       "one of mitigate's own rows"),
    ("mitigate-methods-twice", "mitigate", ["--methods", "[rri, window, rri]"], "--methods [rri, window, rri] names "
                                                                                 "a method twice: give each once"),
    ("mitigate-out-file", "mitigate", ["--out", F], f"--out {F} is a file: give a directory path"),
    ("passkey-threshold-negative", "passkey", ["--threshold", "-1", "--lengths", "128"],
     "--threshold must be in [0, 1) (got -1.0): T_recall is the longest length with accuracy > threshold"),
    ("passkey-threshold-above", "passkey", ["--threshold", "5", "--lengths", "128"], "--threshold must be in [0, 1) "
                                                                                     "(got 5.0)"),
    ("passkey-threshold-one", "passkey", ["--threshold", "1", "--lengths", "128"], "--threshold must be in [0, 1)"),
    ("passkey-seed-negative", "passkey", ["--seed", "-1", "--lengths", "128"], "--seed must be >= 0 (got -1): it "
                                                                                 "seeds the keys"),
    ("passkey-out-file", "passkey", ["--out", F, "--lengths", "128"], f"--out {F} is a file: give a directory path"),
    ("analyze-tokenizer-missing", "analyze", ["--tokenizer", "nope.json"], "--tokenizer nope.json is no file: give "
                                                                            "'byte' or the path of a tokenizer.json"),
    ("mitigate-tokenizer-missing", "mitigate", ["--tokenizer", "nope"], "--tokenizer nope is no file: give 'byte'"),
    ("passkey-tokenizer-missing", "passkey", ["--tokenizer", "nope.json", "--lengths", "128"],
     "--tokenizer nope.json is no file: give 'byte'"),
    ("export-out-file", "export", ["--out", F], f"--out {F} is a file: give a directory path"),
    ("export-out-under-file", "export", ["--out", F + "/sub"], f"--out {F}/sub lies under {F}, which is a file: give "
                                                               "a directory path"),
]


@pytest.mark.parametrize("command,args,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_setting_is_one_line_before_loading(checkpoint, tmp_path, capsys, no_loading, command, args, message):
    path, _ = checkpoint
    file = tmp_path / "a_file"
    file.write_text("not a directory, not JSON")
    args = [a.replace(F, str(file)) for a in args]
    assert error_line(capsys, command, ["--ckpt", str(path), *args]).startswith(message.replace(F, str(file)))


@pytest.mark.parametrize("content", ["", " \n\n"])
@pytest.mark.parametrize("as_folder", [False, True])
def test_analyze_refuses_a_text_without_text(checkpoint, tmp_path, capsys, content, as_folder):
    path, _ = checkpoint
    text = tmp_path / "held_out"
    if as_folder:
        text.mkdir()
        (text / "a.txt").write_text(content)
        (text / "b.md").write_text("")
    else:
        text.write_text(content)
    line = error_line(capsys, "analyze", ["--ckpt", str(path), "--seq_len", "16", "--length", "64", "--text",
                                          str(text), "--out", str(tmp_path / "out")])
    assert line == (f"--text {text} holds no text (only whitespace or nothing): give a file, or a directory of "
                    ".txt/.md/.text files, with held-out text")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["analyze", "mitigate"])
def test_a_bucket_the_criterion_cannot_use_is_refused_before_the_loss_pass(checkpoint, tmp_path, capsys, monkeypatch,
                                                                         command):
    """--bucket above half of T_train (the criterion leaves the first bucket out, so its reference needs a second one
    ending within T_train): one line once T_train is known, before the model is run on the held-out rows."""
    path, text = checkpoint
    runs = []
    for module, name in ((analyze, "measure_forgetting"), (mitigate, "compare_mitigations")):  # watched, not replaced
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _name=name, _real=real, **k: runs.append(_name) or _real(*a, **k))
    line = error_line(capsys, command, ["--ckpt", str(path), "--seq_len", "16", "--length", "64", "--bucket", "9",
                                        "--text", str(text), "--out", str(tmp_path / "out")])
    assert line == ("--bucket must be a whole number between 1 and half the training length, 8 (got 9): the criterion "
                    "leaves the first bucket out, and its reference needs another one ending within 16")
    assert runs == []


@pytest.mark.parametrize("thresholds,why", [
    ('"abc"', "must be rows of numbers"),  # was a TypeError traceback
    ("[1.0, 2.0]", "must be (n_layer, nheads) rows"),
    ("[[-1.0, -1.0], [-1.0, -1.0]]", "must be finite norms >= 0"),  # was taken: each state's sign flipped
    ("[[NaN, 1.0], [1.0, 1.0]]", "must be finite norms >= 0"),  # was taken: that head never clipped
], ids=["text", "one-row", "negative", "nan"])
def test_analyze_refuses_state_norm_thresholds_that_are_no_norms(checkpoint, tmp_path, capsys, no_loading,
                                                                   thresholds, why):
    path, _ = checkpoint
    norms = tmp_path / "norms.json"
    norms.write_text(f'{{"thresholds": {thresholds}}}')
    line = error_line(capsys, "analyze", ["--ckpt", str(path), "--state_norm", str(norms)])
    assert line.startswith(f"--state_norm {norms} is not a thresholds JSON ({norms}: the state-norm thresholds {why}")
