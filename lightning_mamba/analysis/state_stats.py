"""What the SSM state and the forget gate do along a long input, per layer and head.

Per head h of each layer (Mamba-2): alpha_t = exp(dt_t * A_h) is the retention ("forget gate");
first-token retention R_t = prod_{j<=t} alpha_j (paper Fig. 3), kept in log space (sum of dt*A) because it
underflows; the memory strength of token 1 at T_train is alpha_{1:T} = prod_{j=2..T} alpha_j (paper's
notation, alpha_{i:t} = prod_{j=i+1..t} alpha_j). State statistics are taken from the carried state every
``stride`` tokens (the state after that many tokens) and at T_train, over each head's (headdim x d_state) entries, and
averaged over the rows (documents). Nothing here knows how many layers or heads a model has.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from .evaluator import iter_state_samples, sample_ends

# A head's growth past T_train is measured against its own maximum within T_train, but not against less than this
# share of the largest one in its layer: a nearly silent head (in-window variance ~1e-9) would otherwise show a
# "growth" of hundreds from noise-sized changes, in models that forget as well as in those that do not.
GROWTH_FLOOR = 0.01


def growth_reference(inside_max: np.ndarray) -> np.ndarray:
    """(L, H) in-window maxima -> the denominators of the growth ratios (see GROWTH_FLOOR)."""
    floor = GROWTH_FLOOR * inside_max.max(axis=-1, keepdims=True)
    return np.maximum(np.maximum(inside_max, floor), 1e-30)


@dataclass
class StateStats:
    """Arrays are indexed [sample, layer, head] (or [layer, head]); positions count the tokens consumed."""

    probe: str
    seq_len: int  # T_train
    positions: np.ndarray  # (S,)
    rms: np.ndarray  # (S, L, H) sqrt(mean of squared entries) of the state
    mean: np.ndarray  # (S, L, H)
    var: np.ndarray  # (S, L, H) variance over the (headdim, d_state) entries
    outlier_share: np.ndarray  # (S, L, H) share of the variance (squared deviations) in the top entries
    log_retention: np.ndarray  # (S, L, H) log R_t at the sampled positions (mean over rows)
    log_retention_T: np.ndarray | None  # (L, H) log alpha_{1:T_train}; None if rows are shorter than T_train
    mean_alpha: np.ndarray  # (L, H) mean alpha over all positions and rows
    mean_alpha_in: np.ndarray  # (L, H) mean alpha over positions <= T_train
    top_fraction: float = 0.01

    @property
    def retention_T(self) -> np.ndarray | None:
        return None if self.log_retention_T is None else np.exp(self.log_retention_T)

    def summary(self, multiples=(1, 16), retention_threshold: float = 0.99) -> dict:
        """Scalars that pick out the extreme layer/head. ``norm_max@{m}x`` is the max RMS over heads and over
        sampled positions in (mT/2, mT] ((0, T] for m=1); ``norm_growth`` (``var_growth``) the largest per-head
        ratio of the max beyond T_train to the max within; ``outlier_share`` the largest per-head share at the
        last sampled position."""
        T, pos = self.seq_len, self.positions
        out: dict = {"probe": self.probe, "seq_len": T, "evaluated_to": int(pos[-1])}
        for m in multiples:
            sel = (pos > (0 if m == 1 else m * T / 2)) & (pos <= m * T)
            if pos[-1] >= m * T and sel.any():
                out[f"norm_max@{m}x"] = float(self.rms[sel].max())
        inside, beyond = pos <= T, pos > T
        for name, arr in (("norm", self.rms), ("var", self.var)):
            if inside.any() and beyond.any():
                ratio = arr[beyond].max(0) / growth_reference(arr[inside].max(0))  # (L, H)
                out[f"{name}_growth"] = float(ratio.max())
                out[f"{name}_growth_at"] = _argmax_lh(ratio)
        out["outlier_share"] = float(self.outlier_share[-1].max())
        out["outlier_share_at"] = _argmax_lh(self.outlier_share[-1])
        if inside.any():
            out["outlier_share_in"] = float(self.outlier_share[inside][-1].max())
        out["min_mean_alpha"] = float(self.mean_alpha.min())
        out["max_mean_alpha"] = float(self.mean_alpha.max())
        if self.log_retention_T is not None:
            r = self.retention_T
            out[f"frac_heads_above_{retention_threshold}"] = float((r > retention_threshold).mean())
            out["max_first_token"] = float(r.max())
            out["max_first_token_at"] = _argmax_lh(r)
            out["max_log_first_token"] = float(self.log_retention_T.max())
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()}


def _argmax_lh(a: np.ndarray) -> list[int]:
    """[layer, head] of the maximum of a (L, H) array."""
    return [int(i) for i in np.unravel_index(int(np.argmax(a)), a.shape)]


def head_state_stats(ssm: Tensor, top_fraction: float = 0.01) -> dict[str, Tensor]:
    """ssm (b, h, headdim, d_state) -> per (b, h): rms, mean, var, outlier_share (fp64).

    outlier_share = sum of the largest ceil(top_fraction * P*N) squared deviations from the head's mean,
    divided by the sum of all of them (1 entry of P*N holding everything -> (P*N-1)/(P*N) for one top entry)."""
    s = ssm.detach().double().flatten(-2)  # (b, h, P*N)
    mean = s.mean(-1)
    dev2 = (s - mean[..., None]) ** 2
    k = max(1, math.ceil(top_fraction * s.size(-1)))
    total = dev2.sum(-1)
    top = dev2.topk(k, dim=-1).values.sum(-1)
    share = torch.where(total > 0, top / total.clamp_min(1e-300), torch.zeros_like(total))
    return {"rms": s.pow(2).mean(-1).sqrt(), "mean": mean, "var": dev2.mean(-1), "outlier_share": share}


def state_statistics(
    model: torch.nn.Module,
    tokens: Tensor,
    seq_len: int,
    stride: int = 64,
    dtype: str | torch.dtype = torch.float32,
    device=None,
    top_fraction: float = 0.01,
    probe: str = "text",
    batch_size: int | None = None,
) -> StateStats:
    """Run ``model`` over rows ``tokens`` (b, L) in pieces of ``stride`` tokens (and one ending at T_train, so
    the state at exactly T_train is always sampled) and collect the statistics above, averaged over rows
    (``batch_size`` rows through the model at a time; default all)."""
    if tokens.dim() != 2 or tokens.size(1) < 1:
        raise ValueError(f"tokens must be (batch, length >= 1); got shape {tuple(tokens.shape)}")
    step = batch_size or tokens.size(0)
    parts = [(_collect(model, tokens[r:r + step], seq_len, stride, dtype, device, top_fraction), len(tokens[r:r + step]))
             for r in range(0, tokens.size(0), step)]
    n = sum(w for _, w in parts)
    first = parts[0][0]
    avg = {k: None if first[k] is None else sum(p[k] * w for p, w in parts) / n for k in first if k != "positions"}
    return StateStats(probe=probe, seq_len=seq_len, positions=first["positions"], top_fraction=top_fraction, **avg)


def _collect(model, tokens: Tensor, seq_len: int, stride: int, dtype, device, top_fraction: float) -> dict:
    """One batch of rows -> the StateStats arrays, each already averaged over these rows. The per-sample (layer,
    head) statistics go into arrays allocated once for all the samples: a long row's thousands of small tensors, each
    made between two pieces' large ones, would keep the allocator from reusing the space those free."""
    names = ("rms", "mean", "var", "outlier_share", "log_retention")
    positions: list[int] = []
    samples: dict[str, Tensor] = {}
    cum = first_log_alpha = log_ret_T = None
    alpha_sum = alpha_sum_in = None
    for i, p in enumerate(iter_state_samples(model, tokens, stride, dtype, device, extra_ends=(seq_len,))):
        log_alpha = torch.stack([(r["dt"].double() * r["A"].double()) for r in p.record], dim=1)  # (b, L, l, H)
        if cum is None:
            b, n_layer, _, h = log_alpha.shape
            cum = torch.zeros(b, n_layer, h, dtype=torch.float64, device=log_alpha.device)
            alpha_sum = torch.zeros_like(cum)
            alpha_sum_in = torch.zeros_like(cum)
            first_log_alpha = log_alpha[:, :, 0].clone()
            positions = sample_ends(tokens.size(1), stride, (seq_len,))  # the pieces' ends
            samples = {k: torch.empty(len(positions), n_layer, h, dtype=torch.float64, device=cum.device) for k in names}
        assert p.end == positions[i], (p.end, positions[i])
        cs = cum[:, :, None] + log_alpha.cumsum(2)  # log R_t for t in (start, end]
        if p.start < seq_len <= p.end:
            log_ret_T = cs[:, :, seq_len - p.start - 1] - first_log_alpha
        cum = cs[:, :, -1].clone()
        alpha = log_alpha.exp()
        alpha_sum += alpha.sum(2)
        alpha_sum_in += alpha[:, :, : max(0, min(seq_len, p.end) - p.start)].sum(2)
        stats = [head_state_stats(s.ssm, top_fraction) for s in p.state]
        for k in ("rms", "mean", "var", "outlier_share"):
            samples[k][i] = torch.stack([st[k] for st in stats], 1).mean(0)  # (L, H), left on the device
        samples["log_retention"][i] = cum.mean(0)
    n_tokens = tokens.size(1)
    return {
        "positions": np.asarray(positions, dtype=np.int64),
        **{k: v.cpu().numpy() for k, v in samples.items()},
        "log_retention_T": None if log_ret_T is None else log_ret_T.mean(0).cpu().numpy(),
        "mean_alpha": (alpha_sum.mean(0) / n_tokens).cpu().numpy(),
        "mean_alpha_in": (alpha_sum_in.mean(0) / min(seq_len, n_tokens)).cpu().numpy(),
    }


def newline_probe(tokenizer, length: int, n_rows: int = 1) -> Tensor:
    """The newline token repeated ``length`` times, built at the token level (n_rows, length).

    Only meaningful when the tokenizer has a single newline token that training text contains repeated
    (a BPE that merges newlines never sees it repeated)."""
    ids = list(tokenizer.encode("\n"))
    if len(ids) != 1:
        raise ValueError(f"the newline probe needs '\\n' to be one token, but the tokenizer encodes it as {ids}: "
                         "use the text probe (or a byte tokenizer)")
    return torch.full((n_rows, length), ids[0], dtype=torch.long)
