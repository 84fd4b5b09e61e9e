"""The arguments of a micro `lightning-mamba sweep` on the CPU (configs/study/forget_threshold_cpu.yaml over
configs/train.yaml, byte tokenizer, a test's own corpus and cache), shared by the sweep's tests."""

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = os.path.join(ROOT, "configs", "study", "forget_threshold_cpu.yaml")
TRAIN = os.path.join(ROOT, "configs", "train.yaml")


def micro_args(tmp_path, corpus, out, *extra) -> list[str]:
    data = {"tokenizer": "byte", "source": corpus, "cache_dir": str(tmp_path / "cache")}
    return ["--config", MICRO, "--base_config", json.dumps([TRAIN]), "--out", str(out),
            "--data_overrides", json.dumps(data), *extra]
