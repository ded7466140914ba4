"""The trainer's per-step cost against a minimal hand-written loop of the same algorithm, phase by phase.

    python scripts/engine_overhead.py [--configs configs/distill/cd_mnist16.yaml configs/distill/sid_mnist16.yaml]
        [--batch-size 32] [--steps 10] [--rounds 3] [--threads 1] [--out results/engine]

The benchmark is ``distill.eval.engine_bench.overhead`` (its --help says more); this front end gives it the teacher loader
and the student builder.
"""

import os as _os
import sys as _sys

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

from distill.eval.engine_bench import set_loaders
from distill.eval.engine_bench.overhead import main
from students import build_student
from teachers import load_teacher

set_loaders(load_teacher, build_student)

if __name__ == "__main__":
    raise SystemExit(main())
