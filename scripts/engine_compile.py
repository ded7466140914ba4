"""Step time of the trainer eager, with ``compile: true`` and under bf16 autocast, and what each does to the losses.

    python scripts/engine_compile.py [--configs configs/distill/cd_mnist16.yaml configs/distill/sid_mnist16.yaml]
        [--modes eager compile bf16] [--batch-size 32] [--steps 20] [--warmup 5] [--threads 1] [--out results/engine]

The benchmark is ``distill.eval.engine_bench.compile`` (its --help says more); this front end gives it the teacher loader
and the student builder.
"""

import os as _os
import sys as _sys

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

from distill.eval.engine_bench import set_loaders
from distill.eval.engine_bench.compile import main
from students import build_student
from teachers import load_teacher

set_loaders(load_teacher, build_student)

if __name__ == "__main__":
    raise SystemExit(main())
