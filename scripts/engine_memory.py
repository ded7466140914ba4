"""Peak memory of training (issue #34, item 5): from trajectory caches of growing size, of a two-network objective, and
from an HF image dataset on disk of growing size (issue #33, ``--parts dataset``).

    python scripts/engine_memory.py [--sizes 10000 30000 100000] [--steps 50] [--sid-steps 5] [--out results/engine]
        [--tmp /tmp] [--parts caches sid dataset] [--previous OLD/memory.json]
        [--dataset-sizes 10000 100000] [--dataset-steps 30]

The benchmark is ``distill.eval.engine_bench.memory`` (its --help says more); this front end gives it the teacher loader
and the student builder.
"""

import os as _os
import sys as _sys

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

from distill.eval.engine_bench import set_loaders
from distill.eval.engine_bench.memory import main
from students import build_student
from teachers import load_teacher

set_loaders(load_teacher, build_student)

if __name__ == "__main__":
    raise SystemExit(main())
