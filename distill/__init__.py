"""distill: the core of the few-step workbench (schedules, parameterizations, grids, solvers, eval).

Nothing in this package imports ``teachers`` or ``students``.
"""

__version__ = "0.1.0"
