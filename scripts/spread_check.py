"""Check the bench's FID spread on mnist16: one solver cell on several fresh noise-seed sets against its bootstrap.

    OMP_NUM_THREADS=1 python scripts/spread_check.py SOLVER NFE NUM_SAMPLES SEED_SETS     # e.g. dpmpp_2m 4 2000 8

Seed set k uses noise seeds k*N..(k+1)*N-1 (set 0 is the bench's cell); see ``distill.eval.spread_check``.
"""

from __future__ import annotations

import os as _os
import sys as _sys

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

import argparse

import torch

from distill.data import load_dataset
from distill.eval.spread_check import spread_check
from teachers import load_teacher


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("solver")
    p.add_argument("nfe", type=int)
    p.add_argument("num_samples", type=int)
    p.add_argument("seed_sets", type=int)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    spread_check(load_teacher("mnist16"), load_dataset("mnist16", "reference").x, args.solver, args.nfe, args.num_samples,
                 args.seed_sets, log=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
