"""Make (or finish) a trajectory cache: teacher ODE trajectories, every grid state, sharded safetensors.

    python scripts/make_trajectories.py --teacher gmm:ring8 --solver heun --nfe 34 --num-samples 10000 --out DIR
        [--shard-size 1024] [--grid logsnr] [--final t_min] [--guidance-scale W --class-labels] [--seed 0]
        [--prompts prompts:<file>]   (a text-to-image teacher: sample j takes the j-th prompt of a seeded order)

Rerunning the same command resumes: complete shards are kept, missing or truncated ones redone. A folder
made with another teacher or other settings is refused.
"""

from __future__ import annotations

import os as _os
import sys as _sys

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

import argparse
import sys

from distill.core.grids import FINALS, GRIDS
from distill.engine.paths import check_output_dir
from distill.engine.trajectories import generate
from teachers import load_teacher


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--solver", required=True)
    p.add_argument("--nfe", type=int, required=True)
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--grid", default="logsnr", choices=GRIDS)
    p.add_argument("--final", default="t_min", choices=FINALS)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--class-labels", action="store_true", help="draw a random class label per sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", default=None, help="prompt dataset of a text-to-image teacher (stored by reference)")
    args = p.parse_args(argv)
    try:
        check_output_dir(args.out, "--out")
        teacher = load_teacher(args.teacher)
        out = generate(teacher, args.out, solver=args.solver, nfe=args.nfe, num_samples=args.num_samples,
                       shard_size=args.shard_size, grid=args.grid, final=args.final, guidance_scale=args.guidance_scale,
                       seed=args.seed, class_labels=args.class_labels, prompts=args.prompts, log=lambda m: print(m, flush=True))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"trajectory cache complete: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
