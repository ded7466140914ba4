"""Per-time error of students' one-step maps against the teacher's ODE (distill.eval.consistency_error).

    python scripts/consistency_error.py --students cd=results/mnist16/students/cd_mnist16.safetensors \\
        --times 999,800,500,200,50 --num-samples 256 --out results/mnist16_consistency_error

For each student and time t: x_t from held-out real digits (source ``data``) and from the student's own one-step
samples re-noised (source ``one_step``, what its multistep sampling feeds it), the RMS error and mean offset of
f(x_t, t) against the teacher's ODE solution from x_t, and how far that solution lies from the x0 it was noised
from. ``teacher`` as a student name measures the teacher's own denoiser D(x_t, t) (what a teacher-started student
is at step 0 with ``consistency_edm``). Writes consistency_error.csv and .md under --out (rows replaced per student).
Progress: a tqdm bar on stderr over the times of each student and source.
"""

from __future__ import annotations

import os as _os
import sys as _sys

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

import argparse
import csv
import sys
from pathlib import Path

import torch

from distill.core.atomic import csv_text, reports_write_errors, write_text
from distill.data import dataset_tensors, load_dataset
from distill.engine.paths import check_output_dir
from distill.eval.bench import check_student
from distill.eval.consistency_error import consistency_error
from students import load_student
from teachers import load_teacher

FIELDS = ("student", "source", "t", "alpha", "err", "bias", "move", "num_samples", "seed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="mnist16")
    p.add_argument("--students", required=True, help="comma-separated name=path (a student file), or the name teacher")
    p.add_argument("--times", default="999,900,800,700,600,500,400,300,200,100,50", help="comma-separated process times")
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--dataset", default="mnist16")
    p.add_argument("--split", default="heldout", help="split of the real x0 (mnist16: heldout, not trained on)")
    p.add_argument("--reference-steps", type=int, default=40, help="DPM-Solver++(2M) steps of the teacher's reference solve")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-other-teacher", action="store_true", help="measure students distilled from another teacher")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def _students(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, path = item.partition("=")
        if not name or (not path and name != "teacher"):
            raise ValueError(f"--students takes name=path items (or the name teacher), got {item!r}")
        out[name] = path
    return out


@reports_write_errors  # a full disk or a read-only folder: one sentence, the files before kept
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_output_dir(args.out, "--out", files=("consistency_error.csv", "consistency_error.md"))
        students = _students(args.students)
        times = [float(t) for t in args.times.split(",") if t.strip()]
        if args.num_samples < 2 or args.reference_steps < 2 or not times:
            raise ValueError(f"need --num-samples >= 2, --reference-steps >= 2 and one time at least, got "
                             f"{args.num_samples}, {args.reference_steps} and {args.times!r}")
        teacher = load_teacher(args.teacher)
        lo, hi = teacher.schedule.t_min, teacher.schedule.t_max
        if any(not lo <= t <= hi for t in times):
            raise ValueError(f"--times must lie in the teacher's [t_min, t_max] = [{lo:g}, {hi:g}], got {args.times!r}")
        models = {name: (None if name == "teacher" and not path else load_student(path)) for name, path in students.items()}
        for name, student in models.items():  # as the bench: a student is measured against the teacher it was made from
            check_student(teacher, name, student, args.allow_other_teacher, near=Path(students[name]).parent,
                          use=("reference", "measure"))
        x0, labels = dataset_tensors(load_dataset(args.dataset, args.split))
        x0 = x0[:args.num_samples].float()
        cond = labels[:args.num_samples] if getattr(teacher, "num_classes", None) else None
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rows = []
    for name, student in models.items():
        f = teacher.denoise if student is None else student.eval()
        sources = {"data": x0}
        if student is not None and 1 in student.sampling_steps:  # the teacher has no one-step sample worth re-noising
            with torch.no_grad():
                noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed + 1))
                sources["one_step"] = student.sample(noise, 1, cond=cond)
        for source, start in sources.items():
            for r in consistency_error(f, teacher, start, times, cond=cond, reference_steps=args.reference_steps,
                                       generator=torch.Generator().manual_seed(args.seed), desc=f"{name} {source}"):
                rows.append({"student": name, "source": source, **r, "num_samples": len(x0), "seed": args.seed})
                print(f"{name} {source} t {r['t']:g}: err {r['err']:.4f} bias {r['bias']:+.4f} move {r['move']:.4f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "consistency_error.csv"
    kept = [r for r in (list(csv.DictReader(path.open())) if path.exists() else []) if r["student"] not in models]
    write_text(path, csv_text(kept + rows, FIELDS))  # atomic (distill.core.atomic)
    _markdown(list(csv.DictReader(path.open())), args.out / "consistency_error.md")
    print(f"wrote {path} and {args.out / 'consistency_error.md'}")
    return 0


def _markdown(rows: list[dict], path: Path) -> None:
    lines = ["| student | x0 | t | alpha | err | bias | move |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['student']} | {r['source']} | {float(r['t']):g} | {float(r['alpha']):.3f} | {float(r['err']):.4f} | "
                     f"{float(r['bias']):+.4f} | {float(r['move']):.4f} |")
    write_text(path, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
