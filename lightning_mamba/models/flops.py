"""Training FLOPs per token of a Mamba-2 LM, for MFU: the one estimate the LightningModule and the benchmarks use."""

from __future__ import annotations

from .config import MambaConfig


def matmul_params(config: MambaConfig) -> int:
    """Weights every token is multiplied by: each layer's in_proj and out_proj, and the LM head.

    From the config, not the built model: under FSDP the parameters are flat shards that tell no shape."""
    m = config.mixer
    in_proj = config.d_model * (2 * config.d_inner + 2 * m["ngroups"] * m["d_state"] + config.nheads)
    out_proj = config.d_inner * config.d_model
    return config.n_layer * (in_proj + out_proj) + config.d_model * config.padded_vocab_size


def train_flops_per_token(config: MambaConfig, seq_len: int | None = None) -> int:
    """Forward + backward FLOPs per token: 6 x the matmul weights, plus 3 x the SSD scan's forward, per head the
    causal half of the intra-chunk matmuls (Q (N + P): C.B, then its product with x) and the state terms (6 P N).

    The convolution, norms and elementwise work are left out. The scan is counted in whole chunks (the torch scan
    pads the sequence to them), so the estimate takes chunk_size, not the sequence length; a ``seq_len`` that the
    model scans in the attention form (``quadratic_max_len``) is one chunk of that length with no state terms."""
    m = config.mixer
    H, P, N, Q = config.nheads, m["headdim"], m["d_state"], m["chunk_size"]
    if seq_len is not None and seq_len <= m["quadratic_max_len"]:
        ssd = config.n_layer * H * seq_len * (N + P)
    else:
        ssd = config.n_layer * H * (Q * (N + P) + 6 * P * N)
    return 6 * matmul_params(config) + 3 * ssd
