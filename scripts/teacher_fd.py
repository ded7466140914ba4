"""Distance of bench entries to the converged teacher at large N (``distill.eval.teacher_ref``): each entry's samples
against the teacher's own samples on disjoint seeds, with the floor (the teacher against itself on a third seed range).

    python scripts/teacher_fd.py --teacher mnist16 --solver unipc --nfe 20 --num-samples 20000 \\
        --entry student:results/mnist16/students/sid_from_pd1_mnist16.safetensors@1 --entry solver:unipc@4 \\
        --out results/mnist16_teacher_fd/teacher_fd.csv

Entries are ``solver:NAME@NFE`` or ``student:FILE@STEPS`` sampled as their bench cells from seeds --seed..; the teacher
reference uses --ref-seed.., the floor --floor-seed.. (the three ranges must not overlap). Teacher features are cached
in --cache (default runs/teacher_ref) under a hash of what made them. Rows are appended to --out (CSV).
"""

from __future__ import annotations

import argparse
import os as _os
import sys as _sys
from pathlib import Path

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

from distill.core.atomic import append_text, csv_text, reports_write_errors  # noqa: E402
from distill.engine.paths import check_output_file  # noqa: E402
from distill.eval.paired import feature_bench  # noqa: E402
from distill.eval.teacher_ref import check_disjoint, teacher_features, teacher_referenced  # noqa: E402
from students import load_student  # noqa: E402
from teachers import load_teacher  # noqa: E402

FIELDS = ["entry", "fd_teacher", "fd_teacher_std", "precision_teacher", "recall_teacher", "num_samples", "seed", "ref_solver",
          "ref_nfe", "ref_seed", "teacher", "command"]


@reports_write_errors  # a full disk or a read-only folder: one sentence, the files before kept
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--entry", action="append", default=[], help="solver:NAME@NFE or student:FILE@STEPS (repeatable)")
    p.add_argument("--solver", default="unipc", help="the teacher reference's solver")
    p.add_argument("--nfe", type=int, default=20, help="the teacher reference's NFE")
    p.add_argument("--num-samples", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0, help="first noise seed of the entries")
    p.add_argument("--ref-seed", type=int, default=1_000_000, help="first noise seed of the teacher reference")
    p.add_argument("--floor-seed", type=int, default=2_000_000, help="first noise seed of the teacher's floor row")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--cache", type=Path, default=Path("runs/teacher_ref"))
    p.add_argument("--out", type=Path, required=True, help="a CSV file to append rows to")
    args = p.parse_args(argv)
    command = "python scripts/teacher_fd.py " + " ".join(argv if argv is not None else _sys.argv[1:])
    try:
        check_output_file(args.out, "--out")
        check_disjoint(args.num_samples, {"entry": args.seed, "reference": args.ref_seed, "floor": args.floor_seed})
        if args.nfe < 1:
            raise ValueError(f"--nfe must be a positive integer, got {args.nfe}")
        teacher = load_teacher(args.teacher)
        entries, cfg, metric = feature_bench(teacher, args.entry, args.num_samples, args.seed, args.batch_size, load_student)
    except (ValueError, FileNotFoundError) as e:
        _sys.exit(f"error: {e}")
    ref = teacher_features(teacher, cfg, metric, args.solver, args.nfe, args.ref_seed, args.num_samples, args.cache)
    rows = [("teacher floor (disjoint seeds)", args.floor_seed,
             teacher_features(teacher, cfg, metric, args.solver, args.nfe, args.floor_seed, args.num_samples, args.cache))]
    from distill.eval.bench.cells import generate

    rows += [(e.label, args.seed, metric.features(generate(teacher, e.cell(), cfg, e.student)[0])) for e in entries]
    table = []
    for label, seed, feats in rows:
        row = {"entry": label, **teacher_referenced(feats, ref), "num_samples": args.num_samples, "seed": seed,
               "ref_solver": args.solver, "ref_nfe": args.nfe, "ref_seed": args.ref_seed, "teacher": args.teacher,
               "command": command}
        print(f"{label}: FD to the teacher {row['fd_teacher']:.3f} +- {row['fd_teacher_std']:.3f}, precision "
              f"{row['precision_teacher']:.3f}, recall {row['recall_teacher']:.3f}")
        table.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    append_text(args.out, csv_text(table, FIELDS, header=not args.out.is_file()))  # whole rows or none (distill.core.atomic)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
