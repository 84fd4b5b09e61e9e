"""Passkey accuracy along training, from the ``<run>/passkey/step_N.json`` files PasskeyEvalCallback writes: does
retrieval beyond the training length fall as training goes on (paper claim 10 on the passkey task)?

The test is fixed in advance, not chosen by looking at the curve: once in-window accuracy (all lengths <= T_train)
first reaches the threshold, the first ``window`` evaluations are pooled into an early sample and the last
``window`` evaluations into a late one; each length beyond T_train and each needle-distance bucket beyond 1 x T_train
gets a two-proportion z statistic, (early - late) / SE with the pooled SE. ``falls`` when z >= z_crit, ``rises``
when z <= -z_crit, else ``flat``.

The z statistic counts prompts as independent draws, so it only measures sampling noise. Beside it, every case gets
the least-squares slope of its per-evaluation accuracy over all evaluations from saturation on (per 1000 steps),
with a standard error from the evaluations' own scatter around the line, and that scatter against the binomial
one: when evaluations scatter more than their prompts can explain (the model's beyond-window skill moves from
checkpoint to checkpoint), the slope's t is the statistic to read.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re

import numpy as np

from ..analysis.passkey import distance_buckets
from ..analysis.plots import plt
from ..errors import UserError


class PasskeyTrendError(UserError):
    """A run without passkey evaluations, or unusable ones; the command prints it as one line."""


def passkey_dir(run: str) -> str:
    """The directory of step_N.json files: ``run`` itself, or ``run``/passkey."""
    for d in (run, os.path.join(run, "passkey")):
        if glob.glob(os.path.join(d, "step_*.json")):
            return d
    raise PasskeyTrendError(f"{run} holds no passkey evaluations (step_N.json, written by PasskeyEvalCallback "
                            f"under <run>/passkey/): pass a run directory such as runs/NAME/version_0")


def load_history(run: str) -> list[dict]:
    """The run's evaluations, by step; every one must share the first one's grid (lengths, depths, samples)."""
    d = passkey_dir(run)
    records = []
    for path in glob.glob(os.path.join(d, "step_*.json")):
        if re.fullmatch(r"step_\d+\.json", os.path.basename(path)):
            try:
                with open(path) as f:
                    records.append(json.load(f))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise PasskeyTrendError(f"{path} is not a passkey evaluation ({e}): remove or restore it") from None
    if not records:
        raise PasskeyTrendError(f"{d} holds no step_N.json passkey evaluations")
    records.sort(key=lambda r: r["step"])
    first = records[0]
    for r in records[1:]:
        if (r["lengths"], r["depths"], r["samples_per_cell"], r["seq_len"]) != (
                first["lengths"], first["depths"], first["samples_per_cell"], first["seq_len"]):
            raise PasskeyTrendError(f"{d}: step {r['step']} scored another grid than step {first['step']} (lengths, "
                                    f"depths, samples or T_train differ): compare evaluations of one configuration")
    return records


def _correct(record: dict) -> np.ndarray:
    return np.asarray(record["correct"], dtype=float)  # (depths, lengths, samples)


def _z(early: np.ndarray, late: np.ndarray) -> tuple[float, float, float]:
    """(early accuracy, late accuracy, z) of two samples of 0/1 outcomes."""
    p1, p2 = early.mean(), late.mean()
    pooled = np.concatenate([early, late]).mean()
    se = math.sqrt(pooled * (1 - pooled) * (1 / early.size + 1 / late.size))
    z = 0.0 if se == 0 else (p1 - p2) / se
    return float(p1), float(p2), float(z)


def _slope(steps: list[int], acc: np.ndarray, prompts: int) -> dict:
    """Least-squares slope of accuracy per 1000 steps, its t from the residual scatter, and that scatter (SD)
    next to the binomial SD of one evaluation's ``prompts`` prompts."""
    x, n = np.asarray(steps, dtype=float) / 1000, len(steps)
    p = float(acc.mean())
    out = {"slope_per_1k": None, "slope_t": None, "scatter_sd": None, "binomial_sd": math.sqrt(p * (1 - p) / prompts)}
    if n < 3 or np.ptp(x) == 0:
        return out
    slope, intercept = np.polyfit(x, acc, 1)
    resid_sd = math.sqrt(float(((acc - (slope * x + intercept)) ** 2).sum()) / (n - 2))
    se = resid_sd / math.sqrt(float(((x - x.mean()) ** 2).sum()))
    if se < 1e-12:  # evaluations exactly on the line (rounding aside): no scatter to compare with
        t = 0.0 if abs(slope) < 1e-12 else math.copysign(math.inf, slope)
    else:
        t = float(slope / se)
    out.update(slope_per_1k=float(slope), scatter_sd=resid_sd, slope_t=t)
    return out


def trend(records: list[dict], threshold: float = 0.95, window: int = 2, z_crit: float = 2.0) -> dict:
    """Accuracy by length and by distance at every step, and the early-vs-late test (module docstring)."""
    T, lengths = records[0]["seq_len"], records[0]["lengths"]
    inside = [i for i, n in enumerate(lengths) if n <= T]
    steps = [r["step"] for r in records]
    correct = [_correct(r) for r in records]  # one grid for all (load_history checks it)
    buckets = distance_buckets(records[0]["depths"], lengths, T)
    by_length = [c.mean((0, 2)).tolist() for c in correct]
    by_distance = [{k: float(c[m].mean()) for k, m in buckets.items()} for c in correct]
    out = {"seq_len": T, "lengths": lengths, "steps": steps, "accuracy_by_length": by_length,
           "accuracy_by_distance": by_distance, "threshold": threshold, "window": window, "z_crit": z_crit,
           "saturated_at": None, "tests": []}
    if not inside:
        out["note"] = f"no evaluated length is within T_train={T}: in-window saturation is undefined"
        return out
    saturated = next((i for i, acc in enumerate(by_length) if min(acc[j] for j in inside) >= threshold), None)
    if saturated is None:
        out["note"] = f"in-window accuracy never reached {threshold}: nothing to compare yet"
        return out
    out["saturated_at"] = steps[saturated]
    if len(records) - saturated < 2 * window:
        out["note"] = (f"{len(records) - saturated} evaluations from saturation (step {steps[saturated]}) on: "
                       f"the test needs {2 * window} (two windows of {window}); train longer or evaluate more often")
        return out
    early, late = correct[saturated:saturated + window], correct[-window:]
    out["early_steps"], out["late_steps"] = steps[saturated:saturated + window], steps[-window:]

    def pooled(cs, select) -> np.ndarray:
        return np.concatenate([select(c).ravel() for c in cs])

    cases = [(f"{n / T:g}x ({n})", lambda c, j=j: c[:, j, :]) for j, n in enumerate(lengths) if n > T]
    cases += [(f"distance {k}", lambda c, m=m: c[m]) for k, m in buckets.items() if not k.startswith("0-")]
    for name, select in cases:
        a, b = pooled(early, select), pooled(late, select)
        p1, p2, z = _z(a, b)
        verdict = "falls" if z >= z_crit else "rises" if z <= -z_crit else "flat"
        per_eval = np.array([select(c).mean() for c in correct[saturated:]])
        out["tests"].append({"what": name, "early": p1, "late": p2, "prompts": [int(a.size), int(b.size)], "z": z,
                             "verdict": verdict,
                             **_slope(steps[saturated:], per_eval, select(correct[0]).size)})
    return out


def summary_lines(t: dict) -> list[str]:
    T, lengths = t["seq_len"], t["lengths"]
    head = " | ".join(f"{n / T:g}x ({n})" for n in lengths)
    lines = [f"passkey accuracy by prompt length (T_train={T}), per evaluation:", f"| step | {head} |",
             "|---|" + "---|" * len(lengths)]
    lines += [f"| {s} | " + " | ".join(f"{a:.2f}" for a in acc) + " |" for s, acc in zip(t["steps"], t["accuracy_by_length"])]
    buckets = list(dict.fromkeys(k for d in t["accuracy_by_distance"] for k in d))
    lines += ["", "by the needle's distance before the question (units of T_train):",
              "| step | " + " | ".join(buckets) + " |", "|---|" + "---|" * len(buckets)]
    lines += [f"| {s} | " + " | ".join(f"{d[k]:.2f}" if k in d else "-" for k in buckets) + " |"
              for s, d in zip(t["steps"], t["accuracy_by_distance"])]
    lines.append("")
    if t.get("note"):
        lines.append(f"early vs late: {t['note']}")
        return lines
    lines.append(f"in-window accuracy >= {t['threshold']} from step {t['saturated_at']}; early steps "
                 f"{t['early_steps']} vs late steps {t['late_steps']} (|z| >= {t['z_crit']} decides):")
    lines += [f"  {c['what']:>18}: {c['early']:.2f} -> {c['late']:.2f} (n={c['prompts'][0]}/{c['prompts'][1]}, "
              f"z={c['z']:+.1f}) {c['verdict']}" + _slope_text(c) for c in t["tests"]]
    falls = [c["what"] for c in t["tests"] if c["verdict"] == "falls"]
    lines.append("beyond-window accuracy falls along training at: " + (", ".join(falls) if falls else "none"))
    noisy = [c["what"] for c in t["tests"] if c["scatter_sd"] is not None and c["scatter_sd"] > 1.5 * c["binomial_sd"]]
    if noisy:
        lines.append("evaluations scatter more than 1.5 x their sampling noise at: " + ", ".join(noisy) +
                     " (read the slope's t there, not z)")
    return lines


def _slope_text(c: dict) -> str:
    if c["slope_per_1k"] is None:
        return ""
    return (f"; slope {c['slope_per_1k']:+.3f}/1K steps (t={c['slope_t']:+.1f}), scatter SD {c['scatter_sd']:.2f} "
            f"vs binomial {c['binomial_sd']:.2f}")


def plot_trend(t: dict):
    """Accuracy vs training step, one line per prompt length (dashed: within T_train)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    acc = np.asarray(t["accuracy_by_length"])
    for j, n in enumerate(t["lengths"]):
        ax.plot(t["steps"], acc[:, j], marker=".", linestyle="--" if n <= t["seq_len"] else "-",
                label=f"{n / t['seq_len']:g}x ({n})")
    if t.get("early_steps"):
        for s in (t["early_steps"][0], t["late_steps"][0]):
            ax.axvline(s, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("training step")
    ax.set_ylabel("passkey accuracy")
    ax.set_title(f"passkey accuracy along training (T_train = {t['seq_len']})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig
