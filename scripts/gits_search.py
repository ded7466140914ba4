"""GITS time-grid search (distill/solvers/prepared/gits/search.py) for a teacher: warm-up trajectories on a fine grid, the cost matrix of
first-order jumps, and the dynamic programme for every requested step count.

    python scripts/gits_search.py --teacher mnist16 --steps 2,3,4,5,6,7,8,9,10 [--num-samples 256 --fine-steps 60]

Writes runs/prepared/<teacher hash[:16]>/gits.json (or --out): the searched grid per step count, the fine grid, the
cost matrix and the minutes spent. Any solver then uses it: ``sample(..., grid=<file>, final="direct")`` or, in the
bench, ``--variant NAME=unipc:grid=<file>``. Resumable: the warm-up states and cost matrix are kept in
<out>.state.pt (a state made with another teacher or other settings is refused); a new --steps list only reruns the DP.
"""

from __future__ import annotations

import os as _os
import sys as _sys

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from distill.core.atomic import reports_write_errors, write_with
from distill.core.grids import GRIDS
from distill.core.safe_files import load_weights_only
from distill.engine.paths import check_resumable_output
from distill.eval.bench import parse_int_list
from distill.solvers import per_sample_noise
from distill.solvers.prepared import files as prepared
from distill.solvers.prepared.gits import search as gits
from teachers import load_teacher


def warmup_cost(teacher, args, state_path: Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(fine grid, cost matrix, minutes), from the state file when it holds this teacher's and settings' run."""
    key = {"teacher_hash": teacher.hash, "num_samples": args.num_samples, "fine_steps": args.fine_steps,
           "fine_grid": args.fine_grid, "solver": args.solver, "metric": args.metric, "final": args.final, "seed": args.seed,
           "unconditional": args.unconditional}
    if state_path.is_file():
        state = load_weights_only(state_path, "GITS state")  # tensors and plain data only: a pickle runs no code
        if state["key"]["teacher_hash"] != teacher.hash:
            raise ValueError(f"GITS state {state_path} belongs to teacher {state['key']['teacher_hash'][:12]}, not "
                             f"{teacher.name!r} ({teacher.hash[:12]}); give another --out or delete it")
        if state["key"] != key:
            raise ValueError(f"GITS state {state_path} was made with settings {state['key']}; rerun with them or delete it")
        return state["fine_ts"], state["cost"], state["minutes"]
    start = time.perf_counter()
    fine = gits.fine_grid(teacher.schedule, args.fine_steps, args.fine_grid, args.final)
    states, denoised = [], []
    dtype = torch.float64 if hasattr(teacher, "sample_data") else torch.float32
    for lo in tqdm(range(0, args.num_samples, args.batch_size), desc="GITS warm-up"):
        hi = min(lo + args.batch_size, args.num_samples)
        noise = per_sample_noise(teacher.data_shape, range(args.seed + lo, args.seed + hi), dtype)
        cond = None
        if teacher.num_classes:
            cond = torch.full((hi - lo,), -1) if args.unconditional else torch.arange(lo, hi) % teacher.num_classes
        x_T = noise * float(teacher.schedule.init_noise_scale(fine[0]))
        with torch.inference_mode():
            s, d = gits.warmup_trajectories(teacher.denoise, teacher.schedule, x_T, fine, cond=cond, solver=args.solver)
        states.append(s)
        denoised.append(d)
    cost = gits.cost_matrix(torch.cat(states, 1), torch.cat(denoised, 1), teacher.schedule, fine, args.metric)
    minutes = (time.perf_counter() - start) / 60
    state_path.parent.mkdir(parents=True, exist_ok=True)
    state = {"key": key, "fine_ts": fine, "cost": cost, "minutes": minutes}
    write_with(state_path, lambda tmp: torch.save(state, tmp))  # atomic (distill.core.atomic)
    return fine, cost, minutes


@reports_write_errors  # a full disk or a read-only folder: one sentence, the files before kept
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--steps", default="2,3,4,5,6,7,8,9,10", help="comma-separated step counts to search grids for")
    p.add_argument("--num-samples", type=int, default=256, help="warm-up trajectories (GITS: 256)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--fine-steps", type=int, default=60, help="steps of the fine warm-up grid (GITS: 60)")
    p.add_argument("--fine-grid", default="karras", choices=GRIDS, help="spacing of the fine grid (GITS: Karras rho 7)")
    p.add_argument("--solver", default="ipndm", help="warm-up solver (GITS: iPNDM)")
    p.add_argument("--metric", default="l2", choices=gits.METRICS)
    p.add_argument("--coeff", type=float, default=gits.COEFF, help="weight of the cost still to come (GITS: 1.15)")
    p.add_argument("--final", default="direct", choices=("direct", "clean"), help="how the searched grids end (as the bench's --final)")
    p.add_argument("--unconditional", action="store_true", help="warm up a class-conditional teacher with label -1")
    p.add_argument("--seed", type=int, default=10_000_000, help="noise seeds of the warm-up (kept apart from the bench's)")
    p.add_argument("--out", type=Path, default=None, help="default: runs/prepared/<teacher hash[:16]>/gits.json")
    args = p.parse_args(argv)
    try:
        steps = parse_int_list(args.steps, "--steps")
        if max(steps) > args.fine_steps:
            raise ValueError(f"--steps up to {max(steps)} need --fine-steps of at least that many")
        if not (math.isfinite(args.coeff) and args.coeff > 0):
            raise ValueError(f"--coeff is {args.coeff}; allowed: a finite number > 0, the weight of the cost still to come "
                             f"(GITS: {gits.COEFF})")
        if args.num_samples < 1 or args.batch_size < 1:
            raise ValueError(f"--num-samples and --batch-size must be at least 1, got {args.num_samples} and {args.batch_size}")
        teacher = load_teacher(args.teacher)
        out, state = check_resumable_output(args.out or prepared.default_path("gits", teacher), "--out")
        fine, cost, minutes = warmup_cost(teacher, args, state)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    data = gits.save_grids(out, teacher, fine, cost, steps, coeff=args.coeff, final=args.final,
                           meta={"minutes": minutes, "num_samples": args.num_samples, "solver": args.solver,
                                 "metric": args.metric, "fine_grid": args.fine_grid, "cost": cost.tolist()})
    for k, g in data["grids"].items():
        print(f"{k} steps: {[round(t, 2) for t in g['ts']]}")
    print(f"wrote {out} ({minutes:.2f} min of warm-up)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
