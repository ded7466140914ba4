"""distill: the few-step workbench below the model adapters: ``core`` (the noise process and its maths), ``data``,
``solvers`` (the training-free suite and the prepared samplers), ``objectives``, ``engine`` (the trainer and its
files) and ``eval``. Nothing in this package imports ``teachers`` or ``students`` (docs/architecture.md).
"""

__version__ = "0.2.0"
