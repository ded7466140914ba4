"""Paired comparison of two bench entries on the same noise seeds: FID(a) - FID(b) with a 95% bootstrap interval over
the same resampled seeds, and the verdict (a is below / tied with / above b).

    python scripts/paired.py --teacher mnist16 --a student:results/mnist16/students/X.safetensors@2 \
        --b student:results/mnist16/students/Y.safetensors@2 --num-samples 2000 --out results/DIR/paired.jsonl

An entry is ``solver:NAME@NFE`` or ``student:FILE@STEPS``; both are sampled as their bench cells (seeds seed..seed+N-1,
labels i mod K, the bench's grid and final step) and measured against the bench's reference (``distill.eval.paired``).
"""

from __future__ import annotations

import os as _os
import sys as _sys

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

import argparse
import json
from pathlib import Path

from distill.core.atomic import append_text, reports_write_errors
from distill.engine.paths import check_output_file
from distill.eval import bench as lib
from distill.eval.paired import compare, parse_entry
from students import load_student
from teachers import load_teacher


@reports_write_errors  # a full disk or a read-only folder: one sentence, the files before kept
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--a", required=True, help="solver:NAME@NFE or student:FILE@STEPS")
    p.add_argument("--b", required=True, help="solver:NAME@NFE or student:FILE@STEPS")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--resamples", type=int, default=200)
    p.add_argument("--out", type=Path, default=None, help="a JSON-lines file to append the result to")
    args = p.parse_args(argv)
    try:
        if args.out is not None:
            check_output_file(args.out, "--out")
        if args.resamples < 20:
            raise ValueError(f"--resamples must be at least 20, got {args.resamples}")
        teacher = load_teacher(args.teacher)
        a, b = parse_entry(args.a, load_student), parse_entry(args.b, load_student)
        cfg = lib.BenchConfig(num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size)
        cfg.validate(teacher)
        for e in (a, b):
            if e.student is not None:
                lib.check_student(teacher, e.method, e.student, near=Path(e.path).parent)
        metric = lib.make_metric(teacher, cfg)
        metric.check(cfg.num_samples)
    except (ValueError, FileNotFoundError) as e:
        _sys.exit(f"error: {e}")
    result = compare(teacher, cfg, metric, a, b, resamples=args.resamples)
    print(f"{result['a']} - {result['b']}: FID {result['fid_a']:.2f} - {result['fid_b']:.2f} = {result['delta']:+.2f}, "
          f"95% paired interval [{result['low']:+.2f}, {result['high']:+.2f}]: a is {result['verdict']} b")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {**result, "command": "python scripts/paired.py " + " ".join(argv or _sys.argv[1:])}
        append_text(args.out, json.dumps(record) + "\n")  # the whole line or none (distill.core.atomic)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
