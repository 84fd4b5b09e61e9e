"""`lightning-mamba analyze` end to end: on a stubbed tiny model, and on real checkpoints (.ckpt, exported dir)."""

import json

import lightning as L
import pytest
import torch

from lightning_mamba.commands import analyze as cmd, common
from lightning_mamba.data import ByteTokenizer, TextDataModule
from lightning_mamba.models.checkpoint import save_pretrained
from lightning_mamba.training.module import MambaLitModule
from tests.tiny import tiny_lm


@pytest.fixture
def stubbed(monkeypatch, tmp_path):
    meta = {"seq_len": 32}
    monkeypatch.setattr(common, "load_checkpoint", lambda path, backend: (tiny_lm(vocab_size=257), dict(meta)))
    monkeypatch.setattr(common, "load_tokenizer", lambda name, meta: ByteTokenizer())
    ckpt = tmp_path / "run" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    text = tmp_path / "held_out.txt"
    text.write_text("Now is the winter of our discontent.\n" * 5)  # ~190 bytes < 16 x 32: repeated
    return ckpt, text, meta


def test_analyze_writes_verdict_curve_stats_and_pngs(stubbed, capsys):
    """By default to 64 x T_train: the verdict carries ratio_16_64x with its interval, and analyze prints it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ckpt, text, _ = stubbed
    assert cmd.main(["--ckpt", str(ckpt), "--text", str(text), "--tensorboard"]) == 0
    out = ckpt.parent / "analysis"
    printed = capsys.readouterr()
    assert "verdict:" in printed.out and "ratio mean[4T,16T]" in printed.out and "repeated" in printed.err
    assert "ratio mean[16T,64T] / mean[T/2,T]: " in printed.out and "95% bootstrap interval" in printed.out
    assert "only 1 of 32 rows" in printed.err  # the held-out text is short: says so, and what to change
    for phase in ("loss vs position on 1 rows x 2048 tokens", "state statistics (text, newlines)",
                  "writing figures and JSON"):  # each silent phase starts and ends with a line, and its time
        assert f"analyze: {phase} ..." in printed.err and f"analyze: {phase}: done in " in printed.err
    r = json.loads((out / "verdict.json").read_text())
    assert r["seq_len"] == 32 and r["length"] == 64 * 32 and r["bucket"] == 16
    v = r["verdict"]
    assert set(v) >= {"forgets", "blowup_position", "max_in_window", "ratio_long_over_in", "ratio_16_64x",
                      "ratio_16_64x_lo", "ratio_16_64x_hi", "rows", "evaluated_to"}
    assert v["ratio_long_over_in"] is not None and set(r["metrics"]) == {f"loss@{m}x" for m in (1, 2, 4, 8, 16, 32, 64)}
    assert v["ratio_16_64x_lo"] <= v["ratio_16_64x"] <= v["ratio_16_64x_hi"] and v["rows"] == 1
    assert v["evaluated_to"] == 64 * 32
    assert {"text", "newlines"} == set(r["state"])
    assert len((out / "curve.csv").read_text().splitlines()) == 64 * 32 + 1
    for name in ("loss_vs_position", "state_norm_text", "retention_heatmap_text", "log_retention_newlines"):
        assert (out / f"{name}.png").exists()
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert {"lengthgen/ratio_16_64x", "lengthgen/ratio_16_64x_lo", "lengthgen/ratio_16_64x_hi",
            "lengthgen/ratio_4_16x", "lengthgen/loss@64x"} <= set(acc.Tags()["scalars"])
    # run again into the same folder with one probe: the newline probe's figures and the first events go (they
    # stayed beside a state_stats.json without that probe, and TensorBoard drew two points at step 0)
    (out / "notes.png").write_bytes(b"")  # a file of the user's own is not ours to remove
    assert cmd.main(["--ckpt", str(ckpt), "--text", str(text), "--tensorboard", "--probes", "[text]"]) == 0
    assert not list(out.glob("*_newlines.png")) and (out / "state_norm_text.png").exists() and (out / "notes.png").exists()
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_analyze_in_tf32_runs_float32_with_tf32_matmuls_and_says_so(stubbed, capsys, monkeypatch):
    ckpt, text, _ = stubbed
    seen = []
    real = common.load_checkpoint

    def watched(path, backend):
        model, meta = real(path, backend)
        model.mixers[0].register_forward_pre_hook(lambda m, args: seen.append(torch.get_float32_matmul_precision()))
        return model, meta

    monkeypatch.setattr(common, "load_checkpoint", watched)
    assert cmd.main(["--ckpt", str(ckpt), "--text", str(text), "--dtype", "tf32", "--probes", "[text]"]) == 0
    r = json.loads((ckpt.parent / "analysis" / "verdict.json").read_text())
    assert r["dtype"] == "tf32" and "tf32)" in capsys.readouterr().out
    assert seen and set(seen) == {"high"} and torch.get_float32_matmul_precision() == "highest"
    with pytest.raises(SystemExit):  # the CLI's choices
        cmd.main(["--ckpt", str(ckpt), "--text", str(text), "--dtype", "fp8"])


def test_analyze_needs_a_training_length(stubbed, capsys):
    ckpt, text, meta = stubbed
    del meta["seq_len"]
    assert cmd.main(["--ckpt", str(ckpt), "--text", str(text)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("analyze: error:") and "--seq_len" in err and "\n" not in err
    out = stubbed[0].parent / "custom"
    assert cmd.main(["--ckpt", str(ckpt), "--text", str(text), "--seq_len", "16", "--length", "64",
                     "--out", str(out), "--probes", "[text]"]) == 0
    r = json.loads((out / "verdict.json").read_text())
    assert r["seq_len"] == 16 and r["verdict"]["ratio_long_over_in"] is None and set(r["state"]) == {"text"}
    assert "n/a" in capsys.readouterr().out


def test_state_norm_is_checked_as_often_as_mitigate_checks_it(stubbed, monkeypatch):
    """--state_norm: the state is checked as each piece of the evaluation ends, so analyze runs pieces of at most
    T_train / 4 tokens, as mitigate does (it ran --piece_len 2048 pieces: at T_train 32 one check in 64 x T_train, and
    the loss past T_train was that of the model without the fix, where mitigate reported it fixed)."""
    ckpt, text, _ = stubbed
    pieces = []
    real = cmd.measure_forgetting
    monkeypatch.setattr(cmd, "measure_forgetting", lambda *a, **k: pieces.append(k["piece_len"]) or real(*a, **k))
    out = ckpt.parent / "out"
    assert cmd.main(["--ckpt", str(ckpt), "--text", str(text), "--length", "128", "--probes", "[text]",
                     "--out", str(out)]) == 0
    assert cmd.main(["--ckpt", str(ckpt), "--text", str(text), "--length", "128", "--probes", "[text]",
                     "--out", str(out), "--state_norm", "calibrate"]) == 0
    assert pieces == [2048, 8]  # without the state norm: --piece_len as given
    assert json.loads((out / "verdict.json").read_text())["intervention"]["piece_len"] == 8


def test_missing_inputs_are_one_line_errors(stubbed, capsys, tmp_path):
    ckpt, _, _ = stubbed
    assert cmd.main(["--ckpt", str(tmp_path / "nope.ckpt")]) == 2
    assert cmd.main(["--ckpt", str(ckpt), "--text", str(tmp_path / "nope.txt")]) == 2
    errs = capsys.readouterr().err.strip().splitlines()
    assert len(errs) == 2 and "does not exist" in errs[0] and "nope.txt" in errs[1]


def test_tokenizer_from_flag_or_checkpoint(tmp_path):
    load = common.__dict__["load_tokenizer"]
    assert isinstance(load("byte", {}), ByteTokenizer)
    assert isinstance(load(None, {"tokenizer": {"kind": "byte"}}), ByteTokenizer)
    hf_json = ByteTokenizer().to_hf().to_str()  # a tokenizer.json next to an exported/official checkpoint
    assert load(None, {"tokenizer": {"kind": "json", "json": hf_json}}).encode("ab") == [97, 98]
    with pytest.raises(common.CommandError, match="--tokenizer"):
        load(None, {})
    with pytest.raises(ValueError, match="tok.json"):
        load(str(tmp_path / "tok.json"), {})


def test_analyze_real_checkpoint_and_export(tmp_path, capsys):
    """A .ckpt saved by a Trainer records seq_len and the tokenizer: analyze needs nothing else. The same
    weights exported to the official layout need --seq_len and give the same curve."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in range(6):
        (corpus / f"doc{d}.txt").write_text(f"document {d}: " + "the quick brown fox jumps over the lazy dog. " * 8)
    dm = TextDataModule(source=str(corpus), tokenizer="byte", seq_len=16, batch_size=2,
                        val_fraction=0.3, cache_dir=str(tmp_path / "cache"))
    module = MambaLitModule(d_model=32, n_layer=2, d_state=16, headdim=16, chunk_size=16, vocab_size=257,
                            backend="torch", warmup_steps=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    ckpt = tmp_path / "ckpts" / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    text = tmp_path / "held_out.txt"
    text.write_text("a held-out document about foxes and dogs. " * 30)

    args = ["--text", str(text), "--length", "128", "--n_rows", "2", "--probes", "[text]"]
    assert cmd.main(["--ckpt", str(ckpt), *args]) == 0
    r = json.loads((tmp_path / "ckpts" / "analysis" / "verdict.json").read_text())
    assert r["seq_len"] == 16 and r["rows"]["rows"] == 2 and r["verdict"]["evaluated_to"] == 128

    export = tmp_path / "export"
    save_pretrained(module.model, str(export), tokenizer_spec=ByteTokenizer().to_spec())
    assert cmd.main(["--ckpt", str(export), *args]) == 2  # an exported dir does not know T_train
    assert "--seq_len" in capsys.readouterr().err
    assert cmd.main(["--ckpt", str(export), "--seq_len", "16", *args]) == 0
    r2 = json.loads((export / "analysis" / "verdict.json").read_text())
    assert r2["metrics"] == pytest.approx(r["metrics"], rel=1e-5)
    torch.testing.assert_close(torch.tensor(r2["verdict"]["max_in_window"]), torch.tensor(r["verdict"]["max_in_window"]))
