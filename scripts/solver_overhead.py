"""Time per network evaluation spent outside the network: our solvers vs the matching diffusers scheduler.

    python scripts/solver_overhead.py --out results/solver_overhead.csv

What is measured and how: ``distill.eval.solver_overhead``. Median over --repeats runs.
"""

from __future__ import annotations

import os as _os
import sys as _sys

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

import argparse
from pathlib import Path

from distill.core.atomic import csv_text, reports_write_errors, write_text
from distill.eval.solver_overhead import measure
from teachers.diffusers_folder import DiffusersTeacher
from teachers.folders import schedule_from_scheduler_config


@reports_write_errors  # a full disk or a read-only folder: one sentence, the files before kept
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--shapes", default="16x3x32x32,1x4x64x64", help="comma-separated BxCxHxW")
    p.add_argument("--solvers", default="", help="comma-separated subset (default: every pair)")
    p.add_argument("--out", type=Path, default=Path("results/solver_overhead.csv"))
    args = p.parse_args(argv)

    def make_teacher(unet, scheduler):
        schedule, prediction, scale = schedule_from_scheduler_config(dict(scheduler.config))
        return DiffusersTeacher(unet, schedule, prediction, time_scale=scale, content_hash="bench")

    rows = measure(make_teacher, args.shapes.split(","), args.steps, args.repeats,
                   [s for s in args.solvers.split(",") if s], log=lambda m: print(m, flush=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, csv_text(rows, list(rows[0])))  # atomic (distill.core.atomic)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
