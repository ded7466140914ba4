"""A style statistic of student samples against a target set: mean ink (``distill.data.mean_ink``), the fraction of
pixels brighter than half (stroke area, which a blur does not raise as it raises mean ink) and the committed mnist16
classifier's accuracy on the requested labels, on the bench's own samples (``distill.eval.bench.generate``:
sample i from noise seed seed + i with label i mod K), plus a before/after picture per student.

    python scripts/style_stats.py --students cd=results/mnist16/students/cd_mnist16.safetensors,pso=runs/pso/student.safetensors \\
        --student-steps 1,2,4 --num-samples 1000 --target-options stroke=thick,fraction=0.25 --out results/mnist16_pso

Writes <out>/style.csv (a row per student and step count, then the general data and the target set) and, for every
student after the first, <out>/before_after_<name>.png (first student on top, this one below, the same noise). With
``--bench-csv`` (a ``scripts/bench.py`` CSV of the same students, named by file stem) also <out>/results.csv: per
student and step count, mean ink, its 10th percentile ``ink_p10`` (the worst decile's edge when mean ink is the
reward), ``ink_progress`` (the fraction of the way from the first student's mean ink to the
target's) and FID, ``fid_change`` against the first student at the same step count. Progress: a tqdm bar on stderr
over the sample sets (and the bench's bar over each student's batches).
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

import torch
from tqdm import tqdm

from distill.core.atomic import csv_text, reports_write_errors, write_text
from distill.core.progress import above_bars
from distill.data import load_dataset
from distill.engine.paths import check_output_dir
from distill.eval.bench import BenchConfig, Cell, generate, parse_int_list
from distill.eval.fid import load_classifier
from distill.eval.style import joined_rows, parse_students, statistics, target_options  # noqa: F401  (tests read statistics here)
from students import load_student
from teachers import load_teacher


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="mnist16")
    p.add_argument("--students", required=True, help="comma-separated name=path; the first is the 'before' student")
    p.add_argument("--student-steps", default="1,2,4")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", default="mnist16", help="the general data (its train split)")
    p.add_argument("--target-options", default="stroke=thick,fraction=0.25", help="dataset options of the target set")
    p.add_argument("--grid-samples", type=int, default=20, help="samples per row of the before/after pictures")
    p.add_argument("--bench-csv", type=Path, default=None, help="FID rows of the same students (scripts/bench.py)")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def save_pair_grid(before: torch.Tensor, after: torch.Tensor, path: Path) -> None:
    from torchvision.utils import save_image

    save_image(torch.cat([before, after]).clamp(-1, 1) * 0.5 + 0.5, str(path), nrow=len(before), padding=1, pad_value=1.0)


def write_csv(rows: list[dict], path: Path, fields: list[str] | None = None) -> None:
    write_text(path, csv_text(rows, fields or list(rows[0])))  # atomic (distill.core.atomic)


@reports_write_errors  # a full disk or a read-only folder: one sentence, the files before kept
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        inputs = prepare(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    with torch.no_grad():  # not torch.set_grad_enabled(False): main() also runs inside other processes (tests)
        return run(args, *inputs)


def prepare(args) -> tuple:
    """(students by name, their loaded models, step counts, the data and target sets, teacher, classifier): every input
    checked and loaded before any sample is drawn, and the output folder checked before anything is written."""
    students = parse_students(args.students)
    names = ("style.csv", "results.csv", *(f"before_after_{name}.png" for name in list(students)[1:]))
    check_output_dir(args.out, "--out", files=names)
    steps = parse_int_list(args.student_steps, "--student-steps")
    if args.num_samples < 2 or args.grid_samples < 1:
        raise ValueError(f"need --num-samples >= 2 and --grid-samples >= 1, got {args.num_samples} and {args.grid_samples}")
    if args.bench_csv is not None and not args.bench_csv.is_file():
        raise FileNotFoundError(f"no bench CSV at {args.bench_csv} (--bench-csv)")
    sets = {name: load_dataset(args.dataset, "train", **options)
            for name, options in (("data", {}), ("target", target_options(args.target_options)))}
    teacher = load_teacher(args.teacher)
    models = {name: load_student(path).eval() for name, path in students.items()}
    return students, models, steps, sets, teacher, load_classifier()


def run(args, students: dict, models: dict, steps: list[int], sets: dict, teacher, classifier) -> int:
    cfg = BenchConfig(num_samples=args.num_samples, seed=args.seed)
    labels = torch.arange(args.num_samples) % teacher.num_classes if teacher.num_classes else None
    rows, firsts, say = [], {}, above_bars()  # lines printed above the bar, not over it
    with tqdm(total=len(models) * len(steps) + len(sets), desc="style statistics", unit="set") as bar:
        for name, student in models.items():
            for k in steps:
                x, _ = generate(teacher, Cell(name, "student", k, k), cfg, student)
                rows.append({"kind": "student", "name": name, "steps": k, "num_samples": len(x), **statistics(x, labels, classifier)})
                firsts.setdefault(k, {})[name] = x[:args.grid_samples]
                say(str(rows[-1]))
                bar.update(1)
        for name, data in sets.items():
            rows.append({"kind": name, "name": f"{args.dataset} {args.target_options if name == 'target' else 'train'}", "steps": "",
                         "num_samples": len(data), **statistics(data.x, data.labels, classifier)})
            say(str(rows[-1]))
            bar.update(1)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "style.csv", ["kind", "name", "steps", "num_samples", "mean_ink", "ink_std", "ink_p10", "on_fraction",
                                                  "accuracy"])
    if args.bench_csv is not None:
        write_csv(joined_rows(rows, args.bench_csv, students), args.out / "results.csv")
    first = next(iter(students))
    k = min(firsts)
    for name in list(students)[1:]:
        save_pair_grid(firsts[k][first], firsts[k][name], args.out / f"before_after_{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
