"""Provisional verdicts: a cell stopped before its planned steps (e.g. under a time budget) has no result.json yet;
when it has evaluations along training (``cells/<cell>/lengthgen/step_N.json``), its LAST evaluation gives it a
provisional verdict by the same 2x criterion. :func:`.summary.rows_of` counts it for T_forget like a final one, and
the summary marks it as such everywhere (``rows[].provisional``, the T_forget text, the table, the fits, the notes);
a result.json, once written, wins.
"""

from __future__ import annotations

import os

from ..analysis.criterion import VERDICT_WORDS
from .sweep import Study, parse_cell_name, seed_of


def planned_steps(plan: dict | None) -> int | None:
    """The steps every cell of the study trains (tokens_per_cell // tokens_per_batch); None when the plan is not
    known."""
    try:
        return int(plan["tokens_per_cell"]) // int(plan["tokens_per_batch"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def final_eval_length(plan: dict | None, seq_len: int) -> int | None:
    """How far the cell's final evaluation would go (:meth:`Study.eval_length` of the plan); None when unknown."""
    known = {f for f in Study.__dataclass_fields__ if f in (plan or {})}
    if "eval_multiple" not in known:
        return None
    try:
        return Study(**{f: plan[f] for f in known}).eval_length(seq_len)
    except (TypeError, ValueError):
        return None


def model_of_cell(folder: str) -> dict:
    """d_state, n_layer, d_model and N_S (both ways) of the model a cell trains, from its run's ``config.yaml``
    (a row whose cells have no result.json yet is placed by its state size); {} when it is absent or unreadable."""
    import yaml

    from ..training.checkpoint_io import model_config

    try:
        with open(os.path.join(folder, "config.yaml")) as f:
            model = (yaml.safe_load(f) or {}).get("model") or {}
        model = model.get("init_args", model)
        cfg = model_config(**{k: v for k, v in model.items() if isinstance(k, str)})
        return {"d_state": cfg.mixer["d_state"], "n_layer": cfg.n_layer, "d_model": cfg.d_model,
                "n_s": cfg.state_size(), "n_s_ssm_only": cfg.state_size(ssm_only=True)}
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError, KeyError):
        return {}


def provisional_results(plan: dict | None, results: list[dict], onset: dict, out: str) -> list[dict]:
    """A provisional result for every planned cell without a result.json that has evaluations along training
    (``onset["cells"][cell]["history"]``, :func:`.onset.onset_summary`): its LAST evaluation's verdict (forgets,
    fails, or undetermined: a non-finite loss), by the same 2x criterion, under ``provisional``: the step, the
    study's planned steps, how far it evaluated and how far the final evaluation would. :func:`.rows_of` uses them
    as it uses final results (a final result of the same cell wins) and marks what they decide."""
    done = {r["cell"] for r in results}
    steps = planned_steps(plan)
    early = []
    for name in (plan or {}).get("cells", []):
        parsed = parse_cell_name(name)
        history = (onset["cells"].get(name) or {}).get("history") or []
        if name in done or parsed is None or not history:
            continue
        last = history[-1]
        row, t, seed = parsed
        early.append({
            "cell": name, "row": row, "seq_len": t, **({} if seed is None else {"seed": seed}),
            "verdict": {"forgets": last.get("forgets"), "blowup_position": last.get("blowup_position"),
                        "evaluated_to": last.get("evaluated_to"), "undetermined": last.get("undetermined")},
            "provisional": {"step": last["step"], "planned_steps": steps, "evaluated_to": last.get("evaluated_to"),
                            "final_eval_length": final_eval_length(plan, t)},
            **model_of_cell(os.path.join(out, "cells", name))})
    return early


def provisional_mark(r: dict) -> dict:
    """What ``rows[].provisional`` says of one cell: its name, the step of the evaluation that gave its verdict, the
    study's planned steps, how far that evaluation went (and the seed, with seeds)."""
    p = r["provisional"]
    seed = seed_of(r["cell"])
    return {"cell": r["cell"], **({} if seed is None else {"seed": seed}), "step": p["step"],
            "planned_steps": p["planned_steps"], "evaluated_to": p["evaluated_to"]}


def provisional_text(marks: list[tuple[int, dict]]) -> str:
    """``provisional: LEN 32 at step 7,101, LEN 64 seed 1 at step 10,501 of 20,000`` for (LEN, mark) pairs; the
    planned steps once at the end when they are the same for all (they are, in one study)."""
    if not marks:
        return ""
    planned = {m["planned_steps"] for _, m in marks}
    common = next(iter(planned)) if len(planned) == 1 else None
    parts = [f"LEN {t}" + (f" seed {m['seed']}" if m.get("seed") is not None else "") + f" at step {m['step']:,}"
             + (f" of {m['planned_steps']:,}" if common is None and m["planned_steps"] is not None else "")
             for t, m in marks]
    return "provisional: " + ", ".join(parts) + (f" of {common:,}" if common is not None else "")

def provisional_note(r: dict) -> str:
    """``state1024_len64: FAILS at step 10,501 of 20,000``, and how far it evaluated when short of the final
    evaluation's length."""
    p = r["provisional"]
    text = (f"{r['cell']}: {VERDICT_WORDS[r['verdict']['forgets']]} at step {p['step']:,}"
            + (f" of {p['planned_steps']:,}" if p["planned_steps"] is not None else ""))
    if p["evaluated_to"] is not None and p["final_eval_length"] is not None and p["evaluated_to"] < p["final_eval_length"]:
        text += f" (evaluated to {p['evaluated_to']:,} tokens, the final evaluation to {p['final_eval_length']:,})"
    return text
