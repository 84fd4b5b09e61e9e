"""The arguments of a micro `lightning-mamba sweep` on the CPU (configs/study/forget_threshold_cpu.yaml over
configs/train.yaml, byte tokenizer, a test's own corpus and cache, 4 steps per cell), shared by the sweep's tests."""

import json
import os

# 4 steps of 256 tokens per cell, not the config's 8: one evaluation along training (at the end) instead of two,
# whose figures were most of a cell's time. A test that needs two passes --tokens_per_cell 2048 after these
# (the last value given wins), as tests/study/test_cell_records.py does.
TOKENS_PER_CELL = 1024

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = os.path.join(ROOT, "configs", "study", "forget_threshold_cpu.yaml")
TRAIN = os.path.join(ROOT, "configs", "train.yaml")


def micro_args(tmp_path, corpus, out, *extra) -> list[str]:
    data = {"tokenizer": "byte", "source": corpus, "cache_dir": str(tmp_path / "cache")}
    return ["--config", MICRO, "--base_config", json.dumps([TRAIN]), "--out", str(out),
            "--data_overrides", json.dumps(data), "--tokens_per_cell", str(TOKENS_PER_CELL), *extra]
