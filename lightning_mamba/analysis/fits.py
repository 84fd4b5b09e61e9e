"""The paper's two laws, fitted to a study's points (numpy only).

    T_forget = a * N_S + b              (linear; paper: a = 5.172, b = -4.469)
    T_recall = b * (a ** N_S - 1) + c   (exponential; paper: a = 1.365, b = 4.756, c = -0.742)

Units as the paper: N_S in millions (1e6) of state elements, T in thousands of tokens (1K = 1024, the
unit of its power-of-two lengths). Too few finite points, or points that cannot separate the parameters
(all N_S equal), give ``None``: no fit, never a crash.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

PAPER_T_FORGET = {"a": 5.172, "b": -4.469}  # T_forget = 5.172 N_S - 4.469 (paper: R^2 > 0.999)
PAPER_T_RECALL = {"a": 1.365, "b": 4.756, "c": -0.742}  # T_recall = 4.756 (1.365^N_S - 1) - 0.742
N_S_UNIT = 1e6  # N_S in millions
T_UNIT = 1024  # T in K tokens


class LinearFit(NamedTuple):
    a: float  # slope
    b: float  # intercept
    r2: float  # coefficient of determination (nan when all y are equal)


class ExponentialFit(NamedTuple):
    a: float  # base
    b: float  # scale
    c: float  # offset
    r2: float


def _finite(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length (got {x.size} and {y.size})")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def r_squared(y: np.ndarray, y_hat: np.ndarray) -> float:
    ss_res = float(((y - y_hat) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def fit_linear(x, y) -> LinearFit | None:
    """Least-squares line y = a x + b over the finite points; None with fewer than 2 or all x equal."""
    x, y = _finite(x, y)
    if x.size < 2 or np.ptp(x) == 0:
        return None
    (a, b), *_ = np.linalg.lstsq(np.stack([x, np.ones_like(x)], 1), y, rcond=None)
    return LinearFit(float(a), float(b), r_squared(y, a * x + b))


def _given_base(x: np.ndarray, y: np.ndarray, log_a: float) -> tuple[float, float, float]:
    """Closed-form least squares for b, c at a fixed base a = exp(log_a): returns (sse, b, c)."""
    design = np.stack([np.expm1(log_a * x), np.ones_like(x)], 1)
    (b, c), *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(((design @ (b, c) - y) ** 2).sum()), float(b), float(c)


def fit_exponential(x, y, grid: int = 2001) -> ExponentialFit | None:
    """Least-squares y = b (a^x - 1) + c over the finite points; None with fewer than 3 (three parameters)
    or all x equal.

    For a fixed base the model is linear in (b, c), so the fit is a 1-D search over log a: a grid over
    |log a| * max|x| <= 40 (a^x stays finite), then golden-section refinement around the best grid point."""
    x, y = _finite(x, y)
    if x.size < 3 or np.ptp(x) == 0:
        return None
    bound = 40.0 / max(float(np.abs(x).max()), 1e-12)
    ks = np.linspace(-bound, bound, grid)
    ks = ks[np.abs(ks) > bound * 1e-6]  # log a = 0 makes the first column vanish
    sse = [_given_base(x, y, k)[0] for k in ks]
    i = int(np.argmin(sse))
    lo, hi = ks[max(i - 1, 0)], ks[min(i + 1, len(ks) - 1)]
    g = (np.sqrt(5) - 1) / 2
    p, q = hi - g * (hi - lo), lo + g * (hi - lo)
    fp, fq = _given_base(x, y, p)[0], _given_base(x, y, q)[0]
    for _ in range(100):
        if fp < fq:
            hi, q, fq = q, p, fp
            p = hi - g * (hi - lo)
            fp = _given_base(x, y, p)[0]
        else:
            lo, p, fp = p, q, fq
            q = lo + g * (hi - lo)
            fq = _given_base(x, y, q)[0]
    k = min((p, q, ks[i]), key=lambda v: _given_base(x, y, v)[0])
    _, b, c = _given_base(x, y, k)
    a = float(np.exp(k))
    return ExponentialFit(a, b, c, r_squared(y, b * np.expm1(k * x) + c))
