"""Evaluate with training-free mitigations (:mod:`.interventions`) and pick their settings the paper's way:
by the loss at ``at_multiple`` x T_train (default 4) on held-out text, i.e. the mean loss over positions
(m T/2, m T] (the ``loss@{m}x`` metric of ``analyze``).

    losses = evaluate_with(model, rows, seq_len, rri=(0.9999, 0.75))
    result = search_rri(model, rows, seq_len, m_alphas=[1.0, 0.9999, 0.999], m_bs=[1.0, 0.75, 0.5])
    result.best  # {"rri": (0.9999, 0.75), "loss": ...}; result.table: every setting with its loss
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..analysis.criterion import verdict_word
from ..analysis.evaluator import token_losses, window_mean
from ..analysis.forgetting import ForgettingReport, forgetting_report, loss_at_multiple
from .interventions import apply_interventions, calibrate_state_norms, describe, load_state_norms, parse_rri

CALIBRATION_STRIDE = 16  # tokens between the states whose norms set the thresholds


def state_norm_piece_len(piece_len: int, seq_len: int) -> int:
    """Tokens per forward when state normalization is on: the state is checked as each piece ends, so at least every
    T_train / 4 tokens (at the default 2048 a T_train of 64 would be checked once in 32 x T_train, as good as off)."""
    return max(1, min(piece_len, seq_len // 4))


def evaluate_with(
    model,
    tokens: Tensor,
    seq_len: int | None = None,
    piece_len: int = 2048,
    dtype: str | torch.dtype = torch.float32,
    device=None,
    batch_size: int | None = None,
    *,
    rri: tuple[float, float] | None = None,
    dt_scale: float | None = None,
    window: int | None = None,
    state_norm: Tensor | str | None = None,
) -> Tensor:
    """Per-position losses (b, L-1) of :func:`.evaluator.token_losses` with the given mitigations on.

    ``state_norm``: thresholds (n_layer, nheads), a JSON file of them, or ``"calibrate"`` to take them from the first
    ``seq_len`` tokens of ``tokens`` (max norm within T_train, states every 16 tokens). The normalization checks
    the carried state every ``piece_len`` tokens (use a small piece_len for a finer check)."""
    state_norm = resolve_state_norm(model, state_norm, tokens, seq_len, dtype, device, batch_size)
    with apply_interventions(model, rri=rri, dt_scale=dt_scale, window=window, state_norm=state_norm):
        return token_losses(model, tokens, piece_len, dtype, device, batch_size)


def resolve_state_norm(model, state_norm, tokens, seq_len, dtype=torch.float32, device=None, batch_size=None):
    if isinstance(state_norm, str):
        if state_norm != "calibrate":
            return load_state_norms(state_norm)
        if not seq_len:
            raise ValueError("state_norm='calibrate' needs seq_len (T_train): the thresholds are the norms within it")
        return calibrate_state_norms(model, tokens, seq_len, CALIBRATION_STRIDE, dtype, device, batch_size)
    return state_norm


@dataclass
class SearchResult:
    best: dict  # the setting with the lowest loss, and its "loss"
    table: list[dict] = field(default_factory=list)  # every setting with "loss" (mean over (m T/2, m T])
    at_multiple: int = 4

    def to_dict(self) -> dict:
        return {"at_multiple": self.at_multiple, "best": self.best, "table": self.table}


def search(model, tokens: Tensor, seq_len: int, grid: list[dict], at_multiple: int = 4, piece_len: int = 2048,
           dtype: str | torch.dtype = torch.float32, device=None, batch_size: int | None = None,
           log=lambda msg: None) -> SearchResult:
    """Evaluate each setting of ``grid`` (keyword arguments of :func:`evaluate_with`) on ``tokens`` cut to
    at_multiple x seq_len positions and return the one with the lowest loss over (m T/2, m T]. A setting whose loss
    is not finite never wins. Put ``{}`` in the grid to compare against the model as trained."""
    hi = at_multiple * seq_len
    if tokens.size(1) < hi + 1:
        raise ValueError(f"the search scores the loss at {at_multiple} x T_train: tokens need >= {hi + 1} per row "
                         f"(got {tokens.size(1)})")
    if not grid:
        raise ValueError("empty search grid")
    rows = tokens[:, :hi + 1]
    table = []
    for i, setting in enumerate(grid):
        t0 = time.perf_counter()
        losses = evaluate_with(model, rows, seq_len, piece_len, dtype, device, batch_size, **setting)
        loss = loss_at_multiple(losses, seq_len, at_multiple)
        table.append({**setting, "tag": describe(**setting) or "none", "loss": loss})
        log(f"setting {i + 1}/{len(grid)} {table[-1]['tag']}: loss@{at_multiple}x "
            f"{'n/a' if loss is None else f'{loss:.4f}'} ({time.perf_counter() - t0:.1f} s)")
    finite = [row for row in table if row["loss"] is not None and math.isfinite(row["loss"])]
    best = min(finite, key=lambda row: row["loss"]) if finite else table[0]
    return SearchResult(best=best, table=table, at_multiple=at_multiple)


def search_rri(model, tokens, seq_len, m_alphas, m_bs, at_multiple: int = 4, **kw) -> SearchResult:
    """RRI over the grid m_alphas x m_bs (the paper chose m_alpha=0.9999, m_b=0.75 for the 370M model this way)."""
    return search(model, tokens, seq_len, [{"rri": (float(a), float(b))} for a in m_alphas for b in m_bs], at_multiple, **kw)


def search_window(model, tokens, seq_len, windows, at_multiple: int = 4, **kw) -> SearchResult:
    return search(model, tokens, seq_len, [{"window": int(r)} for r in windows], at_multiple, **kw)


def search_dt_scale(model, tokens, seq_len, scales, at_multiple: int = 4, **kw) -> SearchResult:
    return search(model, tokens, seq_len, [{"dt_scale": float(c)} for c in scales], at_multiple, **kw)


# ---- command-line switches (used by ``lightning-mamba analyze``) -----------------------------------------
def add_intervention_args(parser) -> None:
    parser.add_argument("--rri", type=str | None, default=None, help="Evaluate with RRI 'm_alpha,m_b': alpha' = m_alpha "
                        "* alpha, B' = m_b * B (the paper's 370M: 0.9999,0.75).")
    parser.add_argument("--dt_scale", type=float | None, default=None, help="Evaluate with dt' = c * dt (LongMamba-style).")
    parser.add_argument("--window", type=int | None, default=None, help="Evaluate with an exact sliding window of r "
                        "tokens per layer (state difference).")
    parser.add_argument("--state_norm", type=str | None, default=None, help="Evaluate with state normalization: a "
                        "thresholds JSON, or 'calibrate' (max norms within T_train on the evaluation text); the state "
                        "is checked every --piece_len tokens, at least every T_train / 4 (as in `mitigate`).")


def interventions_from_args(args, model, rows: Tensor, seq_len: int, dtype, device, batch_size=None) -> tuple[dict, dict]:
    """(keyword arguments for apply_interventions, a JSON-able description including the tag)."""
    kw = {"rri": parse_rri(args.rri), "dt_scale": args.dt_scale, "window": args.window,
          "state_norm": resolve_state_norm(model, args.state_norm, rows, seq_len, dtype, device, batch_size)}
    kw = {k: v for k, v in kw.items() if v is not None}
    desc = {k: v for k, v in kw.items() if k != "state_norm"}
    if "state_norm" in kw:
        desc["state_norm"] = args.state_norm
        desc["state_norm_thresholds"] = kw["state_norm"].tolist()
    desc["tag"] = describe(**kw)
    return kw, desc


# ---- the comparison: each mitigation at its searched setting, on the same held-out rows -------------------
def default_grid(method: str, seq_len: int) -> list[dict]:
    """The settings ``compare_mitigations`` searches per method; ``{}`` (as trained) is always among them, so a
    method that does not help keeps the model unchanged."""
    if method == "rri":
        return [{}] + [{"rri": (a, b)} for a in (1.0, 0.9999, 0.999, 0.99) for b in (1.0, 0.75, 0.5) if (a, b) != (1.0, 1.0)]
    if method == "dt_scale":
        # c < 1: the paper's LongMamba-style baseline (slower decay, for a model that forgets too soon); c > 1: faster
        # decay, for a model that fails to forget
        return [{}] + [{"dt_scale": c} for c in (0.25, 0.5, 0.75, 1.5, 2.0, 4.0, 8.0, 16.0, 64.0)]
    if method == "window":
        return [{}] + [{"window": r} for r in sorted({max(1, seq_len // 4), max(1, seq_len // 2), seq_len})]
    raise ValueError(f"unknown mitigation {method!r}: use rri, dt_scale, window or state_norm")


MAX_EDGE_STEPS = 4  # how far a search may walk past its grid's edge (c halves: 0.25 -> 0.016 at most)


def edge_moves(best: dict, tried: list[dict]) -> list[dict]:
    """The settings one step past the edge of what was ``tried`` when ``best`` lies on that edge: a smaller dt
    scale than the smallest (c / 2) or a larger than the largest (c x 2), a shorter window than the shortest (r / 2),
    an RRI alpha multiplier further from 1 than the furthest (1 - 2 (1 - m_alpha), keeping m_b) or a smaller m_b
    than the smallest (m_b / 2). Nothing for the model as trained ({}) or a setting inside the grid."""
    moves = []
    if "dt_scale" in best:
        c, scales = best["dt_scale"], [t["dt_scale"] for t in tried if "dt_scale" in t]
        if c == min(scales) and c / 2 >= 2 ** -10:
            moves.append({"dt_scale": c / 2})
        if c == max(scales) and c * 2 <= 2 ** 12:
            moves.append({"dt_scale": c * 2})
    if "window" in best:
        r = best["window"]
        if r == min(t["window"] for t in tried if "window" in t) and r > 1:
            moves.append({"window": r // 2})
    if "rri" in best:
        a, b = best["rri"]
        pairs = [t["rri"] for t in tried if "rri" in t]
        if a < 1 and a == min(p[0] for p in pairs) and 1 - 2 * (1 - a) > 0:
            moves.append({"rri": (1 - 2 * (1 - a), b)})
        if b == min(p[1] for p in pairs) and b / 2 >= 2 ** -10:
            moves.append({"rri": (a, b / 2)})
    return moves


def extend_past_edges(best: dict, tried: list[dict], score, max_steps: int = MAX_EDGE_STEPS,
                      log=lambda msg: None) -> tuple[dict, list[dict]]:
    """Walk past the grid while its best setting lies on an edge and the next step lowers the loss: a grid that
    stops at c = 0.25 must not report 0.25 as the best when 0.1 is better. ``score(settings)`` returns their table
    rows (with ``tag`` and ``loss``, as :func:`search` does). Returns the best row and the rows added."""
    added: list[dict] = []
    for _ in range(max_steps):
        moves = edge_moves({k: v for k, v in best.items() if k not in ("tag", "loss")}, tried)
        if not moves:
            break
        log(f"best {best['tag']} lies on the grid's edge: trying {', '.join(describe(**m) for m in moves)}")
        rows = score(moves)
        tried = tried + moves
        added += rows
        finite = [r for r in rows if r["loss"] is not None and math.isfinite(r["loss"])]
        if not finite or min(r["loss"] for r in finite) >= best["loss"]:
            break
        best = min(finite, key=lambda r: r["loss"])
    return best, added


def curve_metrics(report: ForgettingReport, losses: Tensor) -> dict:
    """The numbers a mitigation is judged by: in-window loss (T/2, T], loss@4x, mean over (4T, end], and the
    verdict of ``report`` (the pipeline's report on ``losses``) with its ratio_16_64x and interval."""
    T, n, v = report.seq_len, losses.size(1), report.verdict
    in_window = report.loss_at[1]
    beyond = window_mean(losses, 4 * T, n) if n > 4 * T else None
    return {"loss_in_window": in_window, "loss@4x": report.loss_at[4], "loss_beyond_4x": beyond,
            "ratio": beyond / in_window if beyond and in_window else None,
            "forgets": v.forgets, "undetermined": v.undetermined, "blowup_position": v.blowup_position,
            "max_in_window": v.max_in_window,
            "ratio_16_64x": v.ratio_16_64x, "ratio_16_64x_lo": v.ratio_16_64x_lo, "ratio_16_64x_hi": v.ratio_16_64x_hi}


AS_TRAINED = "as trained"  # the entry names compare_mitigations gives; ``others`` must use other names
METHOD_NAMES = {"rri": "RRI", "dt_scale": "dt scaling", "window": "sliding window", "state_norm": "state norm"}


def compare_mitigations(model, rows: Tensor, seq_len: int, bucket: int, methods=("rri", "dt_scale", "window", "state_norm"),
                        others: dict | None = None, at_multiple: int = 4, threshold: float = 2.0, piece_len: int = 2048,
                        dtype: str | torch.dtype = torch.float32, device=None, batch_size: int | None = None,
                        log=lambda msg: None) -> list[dict]:
    """The model as trained, then each method at the setting :func:`search` picks (loss at ``at_multiple`` x T on
    the first at_multiple x T positions of ``rows``; past the grid's edge while the best lies on it and the loss
    keeps falling: :func:`extend_past_edges`), then ``others`` ({name: model}, e.g. a fine-tune) as they are;
    every entry evaluated on all of ``rows``. Returns entries with setting, search table, metrics and curve."""
    kw = {"dtype": dtype, "device": device, "batch_size": batch_size}
    entries = []

    def add(name, m, setting, search_table=None, pl=piece_len):
        t0 = time.perf_counter()
        log(f"{name}: evaluating {describe(**setting) or 'as is'} on {rows.size(0)} rows x {rows.size(1) - 1} tokens")
        losses = evaluate_with(m, rows, seq_len, pl, **kw, **setting)
        report = forgetting_report(losses, seq_len, bucket, threshold, multiples=(1, 4))
        entries.append({"name": name, "setting": describe(**setting) or "none", "search": search_table,
                        "metrics": curve_metrics(report, losses),
                        "positions": report.positions.tolist(), "curve": report.curve.tolist()})
        log(f"{name}: {entries[-1]['setting']}: {verdict_word(report.verdict.to_dict(), reason=True)} "
            f"({time.perf_counter() - t0:.1f} s)")

    add(AS_TRAINED, model, {})
    for method in methods:
        if method == "state_norm":  # nothing to search: thresholds from the norms within T_train
            add(METHOD_NAMES["state_norm"], model, {"state_norm": "calibrate"}, pl=state_norm_piece_len(piece_len, seq_len))
            continue
        grid = default_grid(method, seq_len)
        log(f"{method}: searching {len(grid)} settings by the loss at {at_multiple} x T")
        def method_log(msg, method=method):
            log(f"{method}: {msg}")

        result = search(model, rows, seq_len, grid, at_multiple, piece_len, **kw, log=method_log)
        best, past_edge = extend_past_edges(
            result.best, grid, lambda moves: search(model, rows, seq_len, moves, at_multiple, piece_len, **kw).table,
            log=method_log)
        setting = {k: v for k, v in best.items() if k not in ("tag", "loss")}
        table = [{"setting": r["tag"], "loss": r["loss"]} for r in result.table]
        table += [{"setting": r["tag"], "loss": r["loss"], "past_grid_edge": True} for r in past_edge]
        add(METHOD_NAMES[method], model, setting, table)
    for name, other in (others or {}).items():
        add(name, other, {})
    return entries


def markdown_table(entries: list[dict], seq_len: int, at_multiple: int = 4) -> list[str]:
    """One row per entry; ``at_multiple``: where the search scored the settings (mitigate --at_multiple)."""
    def f(x):
        return "-" if x is None or not math.isfinite(x) else f"{x:.3f}"  # a diverged model's NaN: no number

    lines = [f"| model | setting (searched by loss at {at_multiple} x T) | loss (T/2, T] | loss@4x | loss (4T, end] | "
             "ratio | verdict |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        m = e["metrics"]
        pos = m["blowup_position"]
        verdict = verdict_word(m, reason="short")
        if m["forgets"] is False:
            verdict += ", blow-up at " + ("none" if pos is None or pos < 0 else f"{pos} ({pos / seq_len:.1f} T)")
        lines.append(f"| {e['name']} | {e['setting']} | {f(m['loss_in_window'])} | {f(m['loss@4x'])} | "
                     f"{f(m['loss_beyond_4x'])} | {f(m['ratio'])} | {verdict} |")
    return lines
