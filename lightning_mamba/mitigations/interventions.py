"""Training-free mitigations of the failure to forget, switched on at evaluation time (paper, "Training-free
mitigations"). Nothing here changes weights; :func:`apply_interventions` sets hooks on every mixer and removes
them afterwards.

- **RRI** (reduce retention and insertion): alpha' = m_alpha * alpha and B' = m_b * B. Only the decay changes:
  log alpha = dt * A gets + log m_alpha while the input X = x * dt is kept (the mixer folds the offset into the
  scan's dt and rescales the x it scans, so the scan kernels need no change).
- **dt scaling** (LongMamba-style baseline): dt' = c * dt, in the decay and in the input alike.
- **Sliding window** by state difference: :mod:`.window`.
- **State normalization**: per (layer, head) thresholds, the largest state norm seen within T_train
  (:func:`calibrate_state_norms`); a state handed on with ||h|| above its threshold is scaled *down* to it (the
  official code multiplies by the ratio the wrong way round, which scales such states up). Granularity: the check
  runs on the state each forward call hands on, i.e. every ``piece_len`` tokens of a piecewise evaluation
  (:func:`..analysis.evaluator.token_losses`) and every token with ``piece_len=1`` or ``step``; inside one forward
  call the state is not touched.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..atomic import atomic_write_json
from ..models.mixer import LayerState, Mamba2


@dataclass(frozen=True)
class SSMIntervention:
    """The mixer's ``intervention`` hook: dt' = dt_scale * dt, then log alpha += log m_alpha (input kept), B' = m_b * B."""

    m_alpha: float = 1.0
    m_b: float = 1.0
    dt_scale: float = 1.0

    def __post_init__(self):
        if not (self.m_alpha > 0 and self.dt_scale > 0):
            raise ValueError(f"m_alpha and dt_scale must be positive (got m_alpha={self.m_alpha}, dt_scale={self.dt_scale})")

    def __call__(self, mixer: Mamba2, dt: Tensor, A: Tensor, B: Tensor):
        if self.dt_scale != 1.0:
            dt = dt * self.dt_scale
        if self.m_b != 1.0:
            B = B * self.m_b
        return dt, A, B, math.log(self.m_alpha)


@dataclass
class StateNorm:
    """The mixer's ``state_hook``: scale each head's state down to ``thresholds`` (nheads,) where its norm exceeds it."""

    thresholds: Tensor

    def __call__(self, mixer: Mamba2, state: LayerState) -> LayerState:
        return state._replace(ssm=clip_state_norm(state.ssm, self.thresholds))


def clip_state_norm(ssm: Tensor, thresholds: Tensor) -> Tensor:
    """ssm (b, h, p, n); thresholds (h,). Heads with Frobenius norm > threshold are scaled down to it; others are
    returned bit for bit."""
    norm = torch.linalg.vector_norm(ssm, dim=(-2, -1))  # (b, h)
    thr = thresholds.to(device=ssm.device, dtype=norm.dtype)
    scale = torch.where(norm > thr, thr / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.ones_like(norm))
    return ssm * scale[..., None, None].to(ssm.dtype)


def parse_rri(text: str | tuple | list | None) -> tuple[float, float] | None:
    """``"0.9999,0.75"`` (or a pair) -> (m_alpha, m_b), each in (0, 1]: RRI *reduces* retention and insertion
    (alpha' = m_alpha * alpha, B' = m_b * B); m_alpha > 1 would make the decay grow the state instead."""
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        m_alpha, m_b = (float(x) for x in parts)
    except (TypeError, ValueError):  # not two parts, or one that is no number
        raise ValueError(f"RRI takes two numbers m_alpha,m_b (e.g. 0.9999,0.75); got {text!r}") from None
    if not (0 < m_alpha <= 1 and 0 < m_b <= 1):  # NaN too
        raise ValueError(f"RRI's m_alpha and m_b must be in (0, 1] (it reduces retention and insertion: alpha' = "
                         f"m_alpha * alpha, B' = m_b * B; e.g. 0.9999,0.75); got {text!r}")
    return m_alpha, m_b


@contextlib.contextmanager
def apply_interventions(
    model,
    rri: tuple[float, float] | None = None,
    dt_scale: float | None = None,
    window: int | None = None,
    state_norm: Tensor | None = None,
) -> Iterator:
    """Within the block, every mixer of ``model`` (a MambaLM, or anything with ``mixers``) runs with the given
    mitigations; the hooks it had before are restored on exit, also on error.

    rri: (m_alpha, m_b); dt_scale: c; window: r tokens (exact sliding window, :mod:`.window`; start from
    ``state=None``); state_norm: thresholds (n_layer, nheads), e.g. from :func:`calibrate_state_norms`.
    The window keeps its own state and is not combined with state normalization."""
    mixers = list(model.mixers) if hasattr(model, "mixers") else [model]
    if window is not None and state_norm is not None:
        raise ValueError("the sliding window and state normalization do not combine: pick one")
    if window is not None and (int(window) != window or window < 1):
        raise ValueError(f"window must be a positive number of tokens (got {window})")
    if state_norm is not None:
        state_norm = torch.as_tensor(state_norm)
        want = (len(mixers), mixers[0].nheads)
        if tuple(state_norm.shape) != want:
            raise ValueError(f"state_norm thresholds have shape {tuple(state_norm.shape)}; this model needs {want} "
                             "(n_layer, nheads): calibrate them on this model")
    m_alpha, m_b = rri if rri is not None else (1.0, 1.0)
    hook = SSMIntervention(m_alpha, m_b, 1.0 if dt_scale is None else dt_scale)
    saved = [(m.intervention, m.state_hook, m.forward_override) for m in mixers]
    try:
        for i, m in enumerate(mixers):
            if rri is not None or dt_scale is not None:
                m.intervention = hook
            if state_norm is not None:
                m.state_hook = StateNorm(state_norm[i])
            if window is not None:
                from .window import SlidingWindow

                m.forward_override = SlidingWindow(int(window))
        yield model
    finally:
        for m, (a, b, c) in zip(mixers, saved):
            m.intervention, m.state_hook, m.forward_override = a, b, c


def describe(rri=None, dt_scale=None, window=None, state_norm=None) -> str:
    """A short tag such as ``rri0.9999_0.75`` (empty for none), for file names and summaries."""
    tags = []
    if rri is not None:
        tags.append(f"rri{rri[0]:g}_{rri[1]:g}")  # no comma: the tag names a folder
    if dt_scale is not None:
        tags.append(f"dt{dt_scale:g}")
    if window is not None:
        tags.append(f"window{int(window)}")
    if state_norm is not None:
        tags.append("statenorm")
    return "-".join(tags)


# ---- state-norm calibration ---------------------------------------------------------------------
def state_head_norms(state: list) -> Tensor:
    """(b, n_layer, nheads) Frobenius norms of each head's SSM state in a carried model state."""
    return torch.stack([torch.linalg.vector_norm(s.ssm.float(), dim=(-2, -1)) for s in state], dim=1)


def calibrate_state_norms(model, tokens: Tensor, seq_len: int, stride: int = 16, dtype=torch.float32,
                          device=None, batch_size: int | None = None) -> Tensor:
    """Per (layer, head) maximum state norm within T_train = ``seq_len``: over rows ``tokens`` (b, >= 1) and over the
    states after every ``stride`` tokens up to ``seq_len`` (and at seq_len). Run it on the model as trained (outside
    :func:`apply_interventions`) and on held-out text. Returns (n_layer, nheads) fp32 on CPU."""
    from ..analysis.evaluator import iter_state_samples

    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (batch, length); got shape {tuple(tokens.shape)}")
    rows = tokens[:, :seq_len].long()
    best = None
    for r in range(0, rows.size(0), batch_size or rows.size(0)):
        for p in iter_state_samples(model, rows[r:r + (batch_size or rows.size(0))], stride, dtype, device):
            m = state_head_norms(p.state).amax(0).cpu()
            best = m if best is None else torch.maximum(best, m)
    return best


def save_state_norms(path: str, thresholds: Tensor, **meta) -> None:
    atomic_write_json(path, {**meta, "shape": list(thresholds.shape), "thresholds": thresholds.tolist()}, indent=1)


def load_state_norms(path: str) -> Tensor:
    """Thresholds (n_layer, nheads) written by :func:`save_state_norms`, or the ones a ``verdict.json`` of
    ``analyze --state_norm calibrate`` records."""
    with open(path) as f:
        d = json.load(f)
    thresholds = d.get("thresholds", (d.get("intervention") or {}).get("state_norm_thresholds"))
    if thresholds is None:
        raise ValueError(f"{path} has no state-norm thresholds: write them with save_state_norms, or use the "
                         "verdict.json of an `analyze --state_norm calibrate` run")
    return checked_thresholds(thresholds, path)


def checked_thresholds(thresholds, path) -> Tensor:
    """``thresholds`` as a (n_layer, nheads) fp32 tensor of finite norms >= 0: anything else (text, ragged rows, a
    NaN, which never clips, or a negative norm, which would flip the state's sign) is a ValueError naming ``path``."""
    try:
        t = torch.tensor(thresholds, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: the state-norm thresholds must be rows of numbers, one per layer ({e})") from None
    if t.dim() != 2:
        raise ValueError(f"{path}: the state-norm thresholds must be (n_layer, nheads) rows of numbers; got shape "
                         f"{tuple(t.shape)}")
    if not bool(torch.isfinite(t).all() and (t >= 0).all()):
        raise ValueError(f"{path}: the state-norm thresholds must be finite norms >= 0 (a NaN never clips, a negative "
                         f"norm flips the state)")
    return t
