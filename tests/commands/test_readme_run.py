"""What the README says a first run writes and which commands show the options: a tiny `make train`-shaped run writes
the files the README lists under runs/<NAME>/version_0/, and `fit --data.help TextDataModule` lists the data options
that `fit --help` leaves out."""

import glob
import os
import re

import pytest

from lightning_mamba.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN = "runs/state64_len2048/version_0"


def readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_the_run_writes_what_the_readme_lists(tmp_path, corpus):
    text = readme()
    start = text.index("**What to expect.**")
    section = text[start:text.index("\n## ", start)]
    listed = re.findall(r"`([^`]+)`", section[section.index(f"`{RUN}/` holds"):section.index("At LEN 2048")])
    assert "config.yaml" in listed and "checkpoints/last.ckpt" in listed
    main(["fit", "--config", os.path.join(ROOT, "configs", "train.yaml"),
          "--model.d_model", "32", "--model.n_layer", "1", "--model.d_state", "8", "--model.headdim", "16",
          "--model.chunk_size", "32", "--model.backend", "torch", "--model.warmup_steps", "1",
          "--data.source", corpus, "--data.tokenizer", "byte", "--data.seq_len", "32", "--data.batch_size", "2",
          "--data.cache_dir", str(tmp_path / "cache"), "--trainer.max_steps", "100", "--trainer.val_check_interval", "100",
          "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
          "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
          "--trainer.logger.init_args.name", "state64_len2048"])
    run = tmp_path / RUN
    for name in listed[1:]:  # the first is the run directory itself
        pattern = re.sub(r"\{[^}]*\}", "*", name.replace("200", "*").replace("100", "*"))
        assert glob.glob(str(run / pattern)), f"README lists {RUN}/{name}, the run wrote no {pattern}"
    assert f"last checkpoint: {RUN}/checkpoints/last.ckpt" in text

    # every length-generalization scalar the run shows in TensorBoard is one "Watching forgetting" names
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    written = {t for t in acc.Tags()["scalars"] if t.startswith("lengthgen/")}
    watching = text[text.index("## Watching forgetting"):text.index("\n## ", text.index("## Watching forgetting"))]
    named = [tag_pattern(t) for t in re.findall(r"`(lengthgen/[^`]+)`", watching)]
    assert written and not [t for t in written if not any(p.fullmatch(t) for p in named)]


def tag_pattern(name: str) -> re.Pattern:
    """A tag as the README writes it, ``lengthgen/loss@{1,2,...}x`` or ``lengthgen/ratio_far{,_lo,_hi}``, as a regex."""
    parts = re.split(r"(\{[^}]*\})", name)
    return re.compile("".join(
        ("[^/]+" if "..." in p else "(" + "|".join(map(re.escape, p[1:-1].split(","))) + ")") if p.startswith("{")
        else re.escape(p) for p in parts))


def test_data_help_lists_the_data_options(capsys):
    assert "lightning-mamba fit --data.help TextDataModule" in readme()
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--data.help", "TextDataModule"])
    assert stop.value.code in (0, None)
    out = capsys.readouterr().out
    assert "--data.seq_len" in out and "--data.tokenizer" in out
