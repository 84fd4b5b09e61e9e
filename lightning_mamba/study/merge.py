"""Several study folders into one, for one summary: slices of a grid trained on different machines or device
sessions (each with its own ``--out``) come back as separate folders, while T_forget per state size and its fit need
every cell together.

    lightning-mamba sweep --config configs/study/regime.yaml --out runs/study/all --merge '[slice_a, slice_b]'

Every source must be a study folder (its study.json) of the same study settings as the config given: the model,
data and evaluation settings and the training seed must agree (a cell of another corpus or criterion would be judged
as if it were one of these); time budgets (time_per_cell, trainer_overrides) and the token budget may differ. Each source cell folder
is copied whole into ``<out>/cells/`` (atomically: a temporary folder, then a rename) except its checkpoints, so a
merged folder summarizes but does not resume training. A cell already in ``<out>`` or in two sources is refused.
The plan (``<out>/study.json``) becomes the union of the sources' planned cells and axes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict

from .sweep import MUST_AGREE, PLAN_LISTS, Study, SweepError, update_plan

LEFT_OUT = ("*.ckpt",)  # checkpoints: large, and a merged folder is for the summary


def _plan_of(folder: str) -> dict:
    path = os.path.join(folder, "study.json")
    try:
        with open(path) as f:
            plan = json.load(f)
    except OSError:
        raise SweepError(f"{folder} has no study.json: give folders that `lightning-mamba sweep` wrote") from None
    except ValueError as e:
        raise SweepError(f"{path} is not valid JSON ({e}): restore it or leave that folder out") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("cells"), list):
        raise SweepError(f"{path} lists no cells: give folders that `lightning-mamba sweep` wrote")
    return plan


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # tuples and lists alike


def check_sources(study: Study, sources: list[str]) -> dict[str, tuple[dict, list[str]]]:
    """Each source's plan and cell folders, after checking that it is a study folder of this study's settings and
    that no cell name comes twice (in two sources, or already in ``study.out``)."""
    if not sources:
        raise SweepError("--merge got no folders: give a list like '[runs/study/slice_a, runs/study/slice_b]'")
    target = json.loads(json.dumps(asdict(study)))
    out = os.path.abspath(study.out)
    found, seen = {}, {}
    for src in sources:
        if os.path.abspath(src) == out:
            raise SweepError(f"--merge lists the output folder {src} itself: give --out a new or other folder")
        plan = _plan_of(src)
        for key in MUST_AGREE:
            if key in plan and not _same(plan[key], target[key]):
                raise SweepError(f"{src}: {key} is {plan[key]!r} there but {target[key]!r} in this study: merge only "
                                 f"folders of one study's settings (or give the matching --config / --{key})")
        cells = _cells_in(src)
        for name in cells:
            if name in seen:
                raise SweepError(f"cell {name} is in both {seen[name]} and {src}: leave one of them out")
            if os.path.exists(os.path.join(study.out, "cells", name)):
                raise SweepError(f"cell {name} of {src} is already in {study.out}: merge into a new --out folder")
            seen[name] = src
        found[src] = (plan, cells)
    return found


def _cells_in(folder: str) -> list[str]:
    cells = os.path.join(folder, "cells")
    return sorted(d for d in os.listdir(cells) if os.path.isdir(os.path.join(cells, d))) if os.path.isdir(cells) else []


def merge_studies(study: Study, sources: list[str], log=print) -> list[str]:
    """Copy every source's cells into ``study.out`` and join its plan to the one there (:func:`.sweep.update_plan`:
    the sources' cells and axes, ``merged_from``); returns the merged cell names."""
    found = check_sources(study, sources)
    os.makedirs(os.path.join(study.out, "cells"), exist_ok=True)
    merged = []
    for src, (plan, cells) in found.items():
        for name in cells:
            final = os.path.join(study.out, "cells", name)
            tmp = final + ".merging"
            shutil.rmtree(tmp, ignore_errors=True)  # left by a merge killed midway
            shutil.copytree(os.path.join(src, "cells", name), tmp, ignore=shutil.ignore_patterns(*LEFT_OUT))
            os.replace(tmp, final)
        merged += cells
        # the grid's axes are the sources' (the config's would claim cells nobody planned here)
        update_plan(study.out, {**asdict(study), **{key: plan[key] for key in PLAN_LISTS if key in plan},
                                "cells": list(dict.fromkeys([*plan["cells"], *cells])), "merged_from": [src]})
        log(f"sweep: merged {len(cells)} cell(s) from {src}")
    return merged
