"""Fit the Gaussian of Gaussian teleportation (distill/solvers/prepared/teleport/gaussian.py) for a teacher: mean and
covariance of its data in the teacher's scaling, per class for a class-conditional teacher (plus one over all data for label -1).

    python scripts/fit_gaussian.py --teacher mnist16 --data mnist16
    python scripts/fit_gaussian.py --teacher gmm:aniso2d             # analytic teachers: exact data samples

Writes runs/prepared/<teacher hash[:16]>/gaussian.safetensors (or --out), tied to the teacher's hash. Then
``sample(..., teleport=<file>, handoff_sigma=S)`` or, in the bench, ``--variant NAME=unipc:teleport=<file>,handoff_sigma=S``.
One pass over the data and an eigendecomposition per class: seconds.
"""

from __future__ import annotations

import os as _os
import sys as _sys

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

import argparse
import sys
import time
from pathlib import Path

from distill.solvers.prepared import files as prepared
from distill.solvers.prepared.teleport.gaussian import fit_gaussian
from teachers import load_teacher


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--data", default=None, help="mnist16, hf:<name or folder>; default: exact samples of an analytic teacher")
    p.add_argument("--split", default="train")
    p.add_argument("--num-samples", type=int, default=20_000, help="exact samples drawn from an analytic teacher")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unconditional", action="store_true", help="one fit over all data, no per-class fits")
    p.add_argument("--out", type=Path, default=None, help="default: runs/prepared/<teacher hash[:16]>/gaussian.safetensors")
    args = p.parse_args(argv)
    try:
        teacher = load_teacher(args.teacher)
        start = time.perf_counter()
        x0, labels = prepared.teacher_data(teacher, args.data, args.split, n=args.num_samples, seed=args.seed,
                                           unconditional=args.unconditional)
        fit = fit_gaussian(x0, labels, 0 if labels is None else teacher.num_classes, teacher_hash=teacher.hash)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    out = args.out or prepared.default_path("gaussian", teacher)
    fit.save(out)
    print(f"wrote {out} ({len(x0)} samples, {fit.mean.shape[0]} fits, {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
