"""Student networks and their parameterizations (DESIGN.md, contract 5).

``build_student(cfg, teacher)`` makes one for training; ``load_student(path)`` reads an exported
``student.safetensors`` and returns a ``Student`` with ``sample(noise, steps=1, cond=None)``.
"""

from students.build import build_student, load_student
from students.networks import TimeMLP
from students.student import Student

__all__ = ["Student", "TimeMLP", "build_student", "load_student"]
