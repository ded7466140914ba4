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
target's) and FID, ``fid_change`` against the first student at the same step count.
"""

from __future__ import annotations

import os as _os
import sys as _sys

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

import argparse
import csv
from pathlib import Path

import torch

from distill.data import load_dataset, mean_ink
from distill.eval.bench import BenchConfig, Cell, generate, parse_int_list
from distill.eval.fid import load_classifier
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


def statistics(x: torch.Tensor, labels: torch.Tensor | None, classifier) -> dict:
    on = ((x.float().clamp(-1, 1) + 1) / 2 > 0.5).flatten(1).float().mean(1)  # stroke area, blind to blur's grey halo
    ink = mean_ink(x)
    row = {"mean_ink": float(ink.mean()), "ink_std": float(ink.std()), "ink_p10": float(ink.float().quantile(0.1)),
           "on_fraction": float(on.mean())}  # ink_p10: the worst decile's edge when the reward is mean ink
    if labels is not None:
        with torch.no_grad():
            row["accuracy"] = float((classifier(x.clamp(-1, 1)).argmax(1) == labels).float().mean())
    return row


def target_options(text: str) -> dict:
    pairs = [kv.split("=", 1) for kv in text.split(",") if kv]
    return {k: (float(v) if k == "fraction" else v) for k, v in pairs}


def save_pair_grid(before: torch.Tensor, after: torch.Tensor, path: Path) -> None:
    from torchvision.utils import save_image

    save_image(torch.cat([before, after]).clamp(-1, 1) * 0.5 + 0.5, str(path), nrow=len(before), padding=1, pad_value=1.0)


def joined_rows(rows: list[dict], bench_csv: Path, students: dict) -> list[dict]:
    """Style and FID side by side, with progress toward the target and the FID change against the first student."""
    with open(bench_csv) as f:
        fid = {(r["method"], int(r["steps"])): r for r in csv.DictReader(f) if r["kind"] == "student"}
    target = next(r["mean_ink"] for r in rows if r["kind"] == "target")
    cells = {(r["name"], r["steps"]): r for r in rows if r["kind"] == "student"}
    first, out = next(iter(students)), []
    for (name, k), r in cells.items():
        f, f0 = fid.get((Path(students[name]).stem, k)), fid.get((Path(students[first]).stem, k))
        before = cells[(first, k)]["mean_ink"]
        out.append({"name": name, "steps": k, "num_samples": r["num_samples"], "mean_ink": round(r["mean_ink"], 4),
                    "target_ink": round(target, 4), "ink_progress": round((r["mean_ink"] - before) / (target - before), 3),
                    "ink_p10": round(r["ink_p10"], 4),
                    "on_fraction": round(r["on_fraction"], 4), "accuracy": round(r["accuracy"], 4),
                    "fid": f and f["fid"], "fid_std": f and f["fid_std"],
                    "fid_change": f and f0 and round(float(f["fid"]) - float(f0["fid"]), 3),
                    "fid_samples": f and f["num_samples"], "student": students[name]})
    return out


def write_csv(rows: list[dict], path: Path, fields: list[str] | None = None) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    with torch.no_grad():  # not torch.set_grad_enabled(False): main() also runs inside other processes (tests)
        return run(args)


def run(args) -> int:
    teacher = load_teacher(args.teacher)
    cfg = BenchConfig(num_samples=args.num_samples, seed=args.seed)
    classifier = load_classifier()
    labels = torch.arange(args.num_samples) % teacher.num_classes if teacher.num_classes else None
    students = dict(item.split("=", 1) for item in args.students.split(","))
    rows, firsts = [], {}
    for name, path in students.items():
        student = load_student(path).eval()
        for k in parse_int_list(args.student_steps, "--student-steps"):
            x, _ = generate(teacher, Cell(name, "student", k, k), cfg, student)
            rows.append({"kind": "student", "name": name, "steps": k, "num_samples": len(x), **statistics(x, labels, classifier)})
            firsts.setdefault(k, {})[name] = x[:args.grid_samples]
            print(rows[-1], flush=True)
    for name, options in (("data", {}), ("target", target_options(args.target_options))):
        data = load_dataset(args.dataset, "train", **options)
        rows.append({"kind": name, "name": f"{args.dataset} {args.target_options if options else 'train'}", "steps": "",
                     "num_samples": len(data), **statistics(data.x, data.labels, classifier)})
        print(rows[-1], flush=True)
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
