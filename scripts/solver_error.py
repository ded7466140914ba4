"""Training-free solvers on analytic teachers: error vs NFE against exact answers (CSV + plot).

    python scripts/solver_error.py --teachers gmm:ring8 --out runs/demo
    python scripts/solver_error.py --teachers gmm:ring8,gmm:aniso2d,gmm:mix16 --num-samples 2000 --out results/gmm

Resumable: cells already in the CSV are skipped. Solvers that cannot spend an NFE exactly are skipped with a note.
"""

from __future__ import annotations

import os as _os
import sys as _sys

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from distill.core.grids import GRIDS
from distill.eval.solver_error import fits, make_problem, plot, read_rows, run_cell, write_rows
from distill.solvers import SOLVERS
from teachers import load_teacher

DEFAULT_NFE = "3,4,5,6,8,10,15,20,50"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", default="gmm:ring8", help="comma-separated gmm:<preset>[@schedule] specs")
    p.add_argument("--solvers", default="all", help="comma-separated, or 'all' (every deterministic solver: "
                   f"{', '.join(sorted(s for s in SOLVERS if not SOLVERS[s].stochastic))})")
    p.add_argument("--nfe", default=DEFAULT_NFE, help="comma-separated NFE values")
    p.add_argument("--grid", default="logsnr", choices=GRIDS)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-steps", type=int, default=500, help="RK4 steps of the float64 reference solution")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    solvers = sorted(s for s in SOLVERS if not SOLVERS[s].stochastic) if args.solvers == "all" else args.solvers.split(",")
    unknown = [s for s in solvers if s not in SOLVERS]
    if unknown:
        sys.exit(f"error: unknown solver(s) {unknown}; valid solvers: {', '.join(sorted(SOLVERS))}")
    try:
        nfes = [int(n) for n in args.nfe.split(",")]
        teachers = [load_teacher(spec) for spec in args.teachers.split(",")]
    except ValueError as e:
        sys.exit(f"error: {e}")
    if any(not hasattr(t, "sample_data") for t in teachers):
        sys.exit("error: this benchmark needs analytic teachers (gmm:<preset>)")

    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "solver_error_vs_nfe.csv"
    rows = read_rows(csv_path)
    done = {(r["teacher"], r["solver"], r["grid"], int(r["nfe"]), int(r["num_samples"]), int(r["seed"])) for r in rows}
    for teacher in teachers:
        todo = [(s, n) for s in solvers for n in nfes
                if (teacher.name, s, args.grid, n, args.num_samples, args.seed) not in done]
        for s, n in [(s, n) for s, n in todo if not fits(s, n)]:
            print(f"note: {s} cannot spend exactly {n} NFE; cell skipped")
        todo = [(s, n) for s, n in todo if fits(s, n)]
        if not todo:
            continue
        problem = make_problem(teacher, args.num_samples, args.seed, args.reference_steps)
        for s, n in tqdm(todo, desc=teacher.name):
            rows.append(run_cell(problem, s, n, args.grid))
            write_rows(csv_path, rows)
    plot(rows, args.out / "solver_error_vs_nfe.png")
    print(f"wrote {csv_path} and {args.out / 'solver_error_vs_nfe.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
