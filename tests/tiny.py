"""A tiny Mamba-2 LM for measurement and mitigation tests (torch backend, eval mode, seeded)."""

import torch

from lightning_mamba.models import MambaConfig, MambaLM


def tiny_lm(vocab_size=64, n_layer=2, d_state=16, chunk_size=16, seed=0) -> MambaLM:
    torch.manual_seed(seed)
    cfg = MambaConfig(d_model=32, n_layer=n_layer, vocab_size=vocab_size,
                      ssm_cfg={"layer": "Mamba2", "d_state": d_state, "headdim": 16, "chunk_size": chunk_size})
    return MambaLM(cfg, backend="torch").eval()
