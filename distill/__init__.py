"""distill: the few-step workbench below the model adapters: ``core`` (the noise process and its maths), ``data``,
``solvers`` (the training-free suite and the prepared samplers), ``objectives``, ``engine`` (the trainer and its
files) and ``eval``. Nothing in this package imports ``teachers`` or ``students`` (docs/architecture.md).
"""

import os as _os

# OpenMP threads wait passively unless the environment chooses (read when torch loads libgomp, so only before the
# first ``import torch``): a spinning wait collapses training on a shared machine (distill/core/cores.py).
if _os.environ.get("DISTILL_CPU_DEFAULTS", "").lower() not in ("off", "0", "false", "no"):
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.2.0"
