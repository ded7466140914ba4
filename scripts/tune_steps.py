"""Choose a student's multistep sampling times by a greedy FID search and store them in the student file.

    python scripts/tune_steps.py runs/cd_mnist16/student_ema.safetensors --max-steps 4 \\
        --num-samples 1000 --out results/mnist16/students/cd.safetensors

For k = 2..max-steps the k-step times extend the (k-1)-step ones by the candidate time (uniform in log-SNR,
refined once) that gives the lowest FID against the mnist16 ``tune`` split (distill.eval.tune): training digits
3000-3999, in none of the benchmark's reference, floor or held-out sets. Noise seeds start at --seed (default
1,000,000, away from the benchmark's 0..N-1), so the benchmark's numbers are not the ones tuned.
The result is written to --out (atomically; the input is only replaced when --out names it) with the chosen
times in its ``sampling_timesteps`` metadata and the search in ``sampling_search``; ``students.load_student``
and ``scripts/bench.py --students`` use them.
"""

from __future__ import annotations

import os as _os
import sys as _sys

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

import argparse
import json
import sys
from pathlib import Path

import torch

from distill.data import MNIST16_SPLITS, load_dataset
from distill.engine.export import read_student_file, save_student
from distill.engine.paths import check_output_file
from distill.eval.tune import candidate_times, fid_score, greedy_timesteps
from students import load_student
from students.student import MAX_SAMPLING_STEPS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("student", type=Path, help="a student file written by scripts/export.py")
    p.add_argument("--out", type=Path, required=True, help="the tuned student file to write (may equal the input)")
    p.add_argument("--max-steps", type=int, default=MAX_SAMPLING_STEPS, help=f"tune 2..N steps (N <= {MAX_SAMPLING_STEPS})")
    p.add_argument("--num-samples", type=int, default=1000, help="samples per evaluated schedule")
    p.add_argument("--candidates", type=int, default=16, help="candidate times per step (uniform in log-SNR)")
    p.add_argument("--seed", type=int, default=1_000_000, help="noise seeds seed..seed+N-1")
    p.add_argument("--reference-dataset", default="mnist16", help="dataset of the reference images (mnist16)")
    p.add_argument("--reference-split", default="tune", help=f"split of the reference ({', '.join(MNIST16_SPLITS)} for mnist16; "
                   "default tune, data the benchmark reports nothing on)")
    p.add_argument("--batch-size", type=int, default=500)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if not 2 <= args.max_steps <= MAX_SAMPLING_STEPS:
            raise ValueError(f"--max-steps must be between 2 and {MAX_SAMPLING_STEPS}, got {args.max_steps}")
        if args.num_samples < 2 or args.candidates < 1 or args.batch_size < 1:
            raise ValueError(f"need --num-samples >= 2, --candidates >= 1 and --batch-size >= 1, got {args.num_samples}, "
                             f"{args.candidates} and {args.batch_size}")
        check_output_file(args.out, "--out")
        student = load_student(args.student)
        _, meta = read_student_file(args.student)
        reference = load_dataset(args.reference_dataset, args.reference_split).x
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if tuple(reference.shape[1:]) != tuple(student.info.get("data_shape", reference.shape[1:])):
        print(f"error: reference images have shape {tuple(reference.shape[1:])}, the student makes "
              f"{tuple(student.info['data_shape'])}", file=sys.stderr)
        return 1
    k = int(student.info.get("num_classes") or 0)
    labels = torch.arange(args.num_samples) % k if k else None
    score = fid_score(student, reference, num_samples=args.num_samples, seed=args.seed, labels=labels,
                      batch_size=args.batch_size)
    first = student.sampling_timesteps(1).tolist()  # the time the 1-step sample was trained at (not always t_max)
    times, rows = greedy_timesteps(student.schedule, args.max_steps, score, candidate_times(student.schedule, args.candidates),
                                   log=lambda line: print(line, flush=True), progress=True, first=first[0])
    student.sampling_steps = tuple(sorted({*student.sampling_steps, *times}))  # the tuned counts are recorded in the file
    stored = {str(s): student.sampling_timesteps(s).tolist() for s in range(1, MAX_SAMPLING_STEPS + 1)}
    stored.update({str(s): t for s, t in times.items()})
    student.info["sampling_timesteps"] = stored
    best = {str(s): min(r["score"] for r in rows if r["steps"] == s) for s in range(2, args.max_steps + 1)}
    student.info["sampling_search"] = {"metric": "fid", "reference": f"{args.reference_dataset}:{args.reference_split}",
                                       "num_samples": args.num_samples, "seed": args.seed, "best": best,
                                       "evaluations": len(rows)}
    save_student(student, args.out, training_config=json.loads(meta.get("training_config", "{}")))
    for s in range(1, args.max_steps + 1):
        print(f"{s} step(s): t = {[round(t, 3) for t in times[s]]}" + (f", FID {best[str(s)]:.3f}" if s > 1 else ""))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
