"""Exact one-step metrics and recovered mode weights of students distilled from an analytic mixture teacher.

    python scripts/gmm_students.py --teacher gmm:aniso2d --students vsd=runs/dm/vsd_aniso2d dmd=... \
        --num-samples 4000 --out results/gmm/distribution_matching.csv

Each student samples from the bench's per-sample noise (seeds 0..N-1) in one step (``--steps 1 2 4``: a row per
count; a consistency student's re-noising between steps draws from a generator seeded 30000 + seed, the same for
every student). Columns: ``swd`` (sliced W2 to
exact data), ``nll`` (under the exact density), ``ode_rmse`` (against the exact ODE map of the same noise: a
distribution-matching student need not reproduce the teacher's coupling), and the mode weights: the fraction of
samples whose most responsible component (exact posterior at t = 0) is k, with their total-variation distance
``mode_tv`` to the true weights, the smallest and largest recovered weight (``mode_min``, ``mode_max``) and
``modes_lost``, the number of components holding less than a tenth of their true weight. Rows are appended (one per
student; a CSV with other columns is refused), a Markdown table is printed. Progress: a tqdm bar on stderr over the
students' evaluations.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from distill.core.atomic import append_text, csv_text, reports_write_errors, write_text  # noqa: E402
from distill.eval.solver_error import exact_metrics, make_problem  # noqa: E402
from students import load_student  # noqa: E402
from teachers import load_teacher  # noqa: E402


def mode_weights(teacher, x: torch.Tensor) -> torch.Tensor:
    """Fraction of samples assigned to each component by the exact posterior at t = 0."""
    n = len(x)
    zeros = torch.zeros(n, dtype=torch.float64)
    log_n, _, _ = teacher._component_terms(x.double(), torch.ones(n, dtype=torch.float64), zeros)
    k = (teacher.log_weights[None] + log_n).argmax(1)
    return torch.bincount(k, minlength=len(teacher.weights)).double() / n


def student_file(path: Path) -> Path:
    return path / "student.safetensors" if path.is_dir() else path


LOST = 0.1  # a component holding less than this fraction of its true weight counts as lost


def row_for(name: str, teacher, problem, x: torch.Tensor, steps: int) -> dict:
    w = mode_weights(teacher, x)
    true = teacher.weights.to(w)
    return {"teacher": teacher.name, "method": name, "steps": steps, **exact_metrics(problem, x),
            "mode_tv": 0.5 * float((w - true).abs().sum()), "mode_min": float(w.min()), "mode_max": float(w.max()),
            "modes_lost": int((w < LOST * true).sum()),
            "mode_weights": " ".join(f"{v:.3f}" for v in w.tolist()), "num_samples": len(x)}


COLUMNS = ["teacher", "method", "steps", "ode_rmse", "swd", "nll", "mode_tv", "mode_min", "mode_max", "modes_lost",
           "mode_weights", "num_samples"]


@reports_write_errors  # a full disk or a read-only folder: one sentence, the files before kept
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--students", nargs="+", required=True, metavar="NAME=PATH")
    p.add_argument("--num-samples", type=int, default=4000)
    p.add_argument("--steps", type=int, nargs="+", default=[1], help="step counts (one row per student and count)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="CSV to append rows to")
    p.add_argument("--md", default=None, help="Markdown file to write the table to (replaced)")
    args = p.parse_args(argv)
    if args.out and Path(args.out).is_file():
        with open(args.out, newline="") as f:
            header = next(csv.reader(f), None)
        if header != COLUMNS:
            print(f"error: {args.out} has the columns {header}, not {COLUMNS}; write to a new file", file=sys.stderr)
            return 1
    teacher = load_teacher(args.teacher)
    students = {}
    for item in args.students:  # every file loaded and its step counts checked before any work
        name, _, path = item.partition("=")
        students[name] = load_student(student_file(Path(path)))
        missing = [k for k in args.steps if k not in students[name].sampling_steps]
        if missing:
            print(f"error: student {name!r} samples with {', '.join(map(str, students[name].sampling_steps))} steps (the counts "
                  f"its file records), not {', '.join(map(str, missing))}; pass --steps with those", file=sys.stderr)
            return 1
    problem = make_problem(teacher, args.num_samples, args.seed, reference_steps=200)
    fresh = teacher.sample_data(args.num_samples, generator=torch.Generator().manual_seed(20_000 + args.seed))
    rows = [row_for("exact data (another draw)", teacher, problem, fresh, 0)]
    with tqdm(total=len(args.students) * len(args.steps), desc="students", unit="eval") as bar:
        for name, student in students.items():
            for steps in args.steps:
                bar.set_postfix_str(f"{name} {steps} steps", refresh=False)
                with torch.no_grad():
                    renoise = torch.Generator().manual_seed(30_000 + args.seed)  # the same draws for every student
                    x = student.sample(problem.noise.float(), steps=steps, generator=renoise).double()
                rows.append(row_for(name, teacher, problem, x, steps))
                bar.update(1)
    keys = list(rows[0])
    assert keys == COLUMNS, keys
    table = "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] +
                      ["| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |" for r in rows])
    print(table)
    if args.md:
        write_text(args.md, table + "\n")
    if args.out:  # whole rows appended, or the file left as it was (distill.core.atomic)
        append_text(args.out, csv_text(rows, keys, header=not Path(args.out).is_file()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
