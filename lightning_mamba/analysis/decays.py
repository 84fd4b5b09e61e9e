"""The heads' decays of one DecayDynamicsCallback record (``dynamics/step_N.json``: per layer, per head, A, the step
size and alpha over T), read as one array over all heads: what the callback logs and what a study's summary reads."""

from __future__ import annotations

import numpy as np


def over_heads(record: dict, key: str) -> np.ndarray:
    """``record[key]`` (a list per layer of per-head values) as one float64 array over all heads, layer-major."""
    return np.concatenate([np.asarray(v, dtype=np.float64) for v in record[key]])


def decay_stats(record: dict) -> dict[str, float] | None:
    """Over all heads of one record: A, mean dt and alpha over T (from the measured dt where the callback probed
    held-out rows, else from softplus(dt_bias)), the slowest head's alpha over T and how many heads exceed the
    record's threshold. None for a record of another shape."""
    try:
        A = over_heads(record, "A")
        alpha = over_heads(record, "alpha_T" if "alpha_T" in record else "alpha_T_bias")
        dt = over_heads(record, "dt_mean" if "dt_mean" in record else "dt_bias_softplus")
    except (KeyError, ValueError, TypeError):
        return None
    threshold = float(record.get("threshold", 0.99))
    return {"A_max": float(A.max()), "A_median": float(np.median(A)), "dt_mean_median": float(np.median(dt)),
            "alpha_T_max": float(alpha.max()), "alpha_T_median": float(np.median(alpha)),
            "heads_alpha_T_above": int((alpha > threshold).sum()), "threshold": threshold}
