"""``lightning-mamba sweep``: the T_forget study. One model per (STATE, LEN) with the same token budget, each judged
with the paper's criterion far past LEN; then T_forget per state size and the paper's laws fitted.

    lightning-mamba sweep --config configs/study/forget_threshold.yaml
    lightning-mamba sweep --config configs/study/forget_threshold.yaml --states [16,64] --lens [256,1024]
    CUDA_VISIBLE_DEVICES=1 lightning-mamba sweep --config ... --shard 1/4      # one process per GPU
    lightning-mamba sweep --config configs/study/regime.yaml --processes 4 --mps true  # 4 shards at once under CUDA MPS
    lightning-mamba sweep --config configs/study/regime.yaml --seeds '[0,1,2]'  # every cell once per seed
    lightning-mamba sweep --config ... --prepare_only true                      # tokenizer + caches, once
    lightning-mamba sweep --config ... --summarize_only true                    # after every shard is done
    lightning-mamba sweep --config ... --out runs/study/all --merge '[a, b]'    # slices' folders: one summary
    lightning-mamba sweep --out runs/study/map --map_summaries '[a/summary.json, b/summary.json]'  # one grid map

Re-running the same command skips finished cells and resumes a killed one from its last.ckpt. See docs/study.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields

from jsonargparse import ActionConfigFile, ArgumentParser

from ..study.sweep import Study, SweepError, build_cli, cell_args, check_out, make_cells, run_study, shard_cells
from ..training.run_checks import RUN_KEYS, STUDY_KEYS, config_files, config_mapping, typed_options
from . import run_command
from .common import CommandParser
from .mps import MPSError, private_daemon, time_slicing_note


def build_parser() -> ArgumentParser:
    p = CommandParser(prog="lightning-mamba sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action=ActionConfigFile, help="A study config (YAML), e.g. "
                   "configs/study/forget_threshold.yaml; later arguments override it.")
    p.add_class_arguments(Study)
    p.add_argument("--summarize_only", type=bool, default=False, help="Only (re)write the summary from the cells' "
                   "result.json files (e.g. after all shards finished).")
    p.add_argument("--dry_run", type=bool, default=False, help="Print this shard's cells and their `lightning-mamba "
                   "fit` arguments, run nothing.")
    p.add_argument("--prepare_only", type=bool, default=False, help="Only build the tokenizer and token caches the "
                   "cells share (run once before starting several shards, so they do not all build them).")
    p.add_argument("--processes", type=int, default=1, help="Run the grid as this many shards at once, each a process "
                   "of its own (on one GPU it pays only under MPS, --mps true, about 4 for the study's tiny models; with "
                   "several GPUs, shard i gets GPU i mod count), logs in <out>/logs/shard_<i>.log, then write the summary.")
    p.add_argument("--mps", type=bool, default=False, help="With --processes N on a GPU: run the shards under a CUDA "
                   "MPS daemon of this sweep's own (nvidia-cuda-mps-control, quit at the end), so their kernels share "
                   "the GPU at once instead of taking turns.")
    p.add_argument("--merge", type=list[str] | None, default=None, help="Study folders to merge into --out (their "
                   "cells, checkpoints left out, and plans; same study settings required), then write the summary of "
                   "all of them; trains nothing. E.g. slices run on different machines: '[runs/study/a, runs/study/b]'.")
    p.add_argument("--map_summaries", type=list[str] | None, default=None, help="Draw one states x LEN map of these "
                   "studies' summary.json files (every cell's evaluations along training, e.g. slices run on "
                   "different machines) into --out: grid_map.png, grid_map.json (with T_forget seed by seed and its "
                   "fit) and t_forget_per_seed.png; trains and summarizes nothing.")
    p.add_argument("--map_min_evaluated_to", type=int, default=32768, help="With --map_summaries: the seeds' "
                   "T_forget counts only evaluations that reached this many tokens (the 2x test far out).")
    p.add_argument("--tensorboard", type=bool, default=True, help="Also write the summary as a TensorBoard run "
                   "<out>/summary.")
    return p


OVERRIDES = ("model_overrides", "data_overrides", "trainer_overrides")


def parse_args(argv: list[str]):
    """The command's arguments. An ``--*_overrides`` dict typed after ``--config`` is merged into the config's
    (jsonargparse would replace it whole: ``--model_overrides '{quadratic_max_len: 64}'`` would drop the regime's
    a_lr_mult 10 without a word); a key typed as null is removed. ``--print_config`` prints the merged dicts."""
    parser = build_parser()
    for path in config_files(argv):  # jsonargparse: "Option 'trainer.max_steps' is not accepted"
        keys = set(config_mapping(path) or {})
        if keys & set(RUN_KEYS) and not keys & set(STUDY_KEYS):
            parser.error(f"--config {path} is a run config, read by `lightning-mamba fit --config`: a study file "
                         f"(configs/study/) names it in base_config")
    given = typed_options(argv)
    typed = [k for k in OVERRIDES if k in given]
    printing = [a for a in argv if a == "--print_config" or a.startswith("--print_config=")]
    if typed and printing:  # jsonargparse would print the typed dict alone
        argv = [a for a in argv if a not in printing]
    args = parser.parse_args(argv)
    if typed:
        base = parser.parse_args(_without(argv, typed))
        for key in typed:
            merged = {**(base[key] or {}), **(args[key] or {})}
            setattr(args, key, {k: v for k, v in merged.items() if v is not None})
    if typed and printing:
        flags = printing[-1].partition("=")[2].split(",")
        print(parser.dump(args, skip_default="skip_default" in flags, skip_none="skip_null" in flags), end="")
        sys.exit(0)
    return args


def _without(argv: list[str], keys: list[str]) -> list[str]:
    """argv less the ``--key value`` / ``--key=value`` of these keys."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in (f"--{k}" for k in keys):
            skip = True
        elif not a.startswith(tuple(f"--{k}=" for k in keys)):
            out.append(a)
    return out


def study_from(args) -> Study:
    values = args.as_dict()  # plain dicts all the way down (nested class_path dicts parse as Namespaces)
    return Study(**{f.name: values[f.name] for f in fields(Study)})


def is_rank_zero() -> bool:
    """False in the extra processes of a multi-device cell (they run this command too, started by Lightning)."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def run_shards(study: Study, argv: list[str], processes: int, log=print, mps: bool = False) -> str | None:
    """The grid as ``processes`` shards at once: one ``lightning-mamba sweep ... --shard i/n`` subprocess each, after
    the shared caches are built here once; with ``mps``, under a CUDA MPS daemon of their own. Returns None, or a
    line naming the shards that failed."""
    if study.shard != "0/1":
        raise SweepError(f"--processes {processes} runs every shard itself: drop --shard {study.shard}")
    build_cli(study, make_cells(study)[0]).datamodule.prepare_data()
    gpus = _cuda_count()
    if mps:
        with private_daemon(log) as mps_env:
            return _launch(study, argv, processes, gpus, mps_env, log)
    note = time_slicing_note(processes, gpus)
    if note:
        log(note)
    return _launch(study, argv, processes, gpus, {}, log)


# this module by name: under `python -m` its __name__ is "__main__", which a shard's `-m` cannot find
_MODULE = "lightning_mamba.commands.sweep"


def _launch(study: Study, argv: list[str], processes: int, gpus: int, extra_env: dict[str, str], log) -> str | None:
    folder = os.path.join(study.out, "logs")
    os.makedirs(folder, exist_ok=True)
    running = []
    for i in range(processes):
        env = {**os.environ, **extra_env}
        if gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        path = os.path.join(folder, f"shard_{i}.log")
        cmd = [sys.executable, "-m", _MODULE, *argv, "--shard", f"{i}/{processes}",
               "--processes", "1", "--mps", "false", "--tensorboard", "false"]
        with open(path, "w") as out:
            running.append((i, path, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)))
    log(f"sweep: {processes} shards started, logs in {folder}")
    failed = [(i, path) for i, path, proc in running if proc.wait() != 0]
    if failed:
        return (f"{len(failed)} of {processes} shards failed (" + ", ".join(f"shard {i}: {p}" for i, p in failed)
                + "): see the end of each log; re-running the same command resumes")
    return None


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    study = study_from(args)
    from ..study.summary import summarize, summary_lines

    def work() -> list[str]:
        if args.map_summaries is not None:
            from ..study.summary_map import write_summary_map

            check_out(study.out)
            return write_summary_map(args.map_summaries, study.out, args.map_min_evaluated_to)
        study.validate()
        if args.dry_run:
            # eval_min_tokens reaches the cell's callbacks once built, not through an argument (floor_lengthgen)
            floor = "" if study.eval_min_tokens is None else (f"  # and LengthGeneralizationCallback min_length "
                                                              f"{study.eval_min_tokens} (eval_min_tokens)")
            return [f"{cell.name}: lightning-mamba fit " + " ".join(repr(a) if not a or " " in a else a
                                                                     for a in cell_args(study, cell)) + floor
                    for cell in shard_cells(make_cells(study), study.shard)]
        if args.prepare_only:
            dm = build_cli(study, make_cells(study)[0]).datamodule
            dm.prepare_data()
            return [f"sweep: tokenizer and token caches ready under {dm.hparams.cache_dir}"]
        if args.processes < 1:
            raise SweepError(f"--processes must be >= 1 (got {args.processes})")
        gpus = _cuda_count() if args.mps else None
        if args.mps and (args.processes < 2 or gpus == 0):
            raise SweepError("--mps true runs several shards at once on a CUDA GPU: it needs --processes 2 or more "
                             f"and a GPU (got --processes {args.processes}, {gpus} GPU(s)): drop --mps")
        if not args.summarize_only:  # (a summary of a folder that is no study's says so)
            check_out(study.out)
        failure = None
        if args.merge is not None:
            from ..study.merge import merge_studies

            merge_studies(study, args.merge)
        elif args.processes > 1 and not args.summarize_only:
            failure = run_shards(study, argv, args.processes, mps=args.mps)
        elif not args.summarize_only:
            run_study(study)
        if not is_rank_zero():
            return []
        if failure:
            try:  # what the other shards finished, before the error line (there may be nothing yet)
                print("\n".join(summary_lines(summarize(study.out, tensorboard=args.tensorboard))))
            except (SweepError, ValueError, OSError):
                pass
            raise SweepError(failure)
        return summary_lines(summarize(study.out, tensorboard=args.tensorboard))

    # ValueError includes ConfigError and DataError: one line each
    return run_command("sweep", work, (SweepError, MPSError, OSError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
