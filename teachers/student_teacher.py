"""An exported student presented through the teacher contract: ``load_teacher("student:<file.safetensors>")``.

This is how a student teaches the next round (progressive distillation's halving, a second reflow round): the
teacher's denoiser is the student's map f(x, t) (its data prediction D_theta for ``denoiser`` students), its
schedule the student's, its network (``model``, ``unet``) the student's, so ``student.arch: teacher`` copies it
and ``init_from`` is not needed to start from it. ``hash`` is the file's sha256; ``sampling_timesteps(k)`` are
the times the student samples with.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill.engine.lineage import root_teacher
from distill.engine.paths import file_sha256
from teachers.base import Teacher


class StudentTeacher(Teacher):
    def __init__(self, student, *, name: str, content_hash: str):
        self.student = student.eval().requires_grad_(False)
        self.model = self.student  # a NetDenoiser: copied by teacher_copy / student.arch "teacher"
        self.unet = student.net
        self.schedule, self.prediction_type, self.time_scale = student.schedule, student.prediction_type, student.time_scale
        self.null_class_label = student.null_class_label
        self.data_shape = tuple(student.info.get("data_shape") or ())
        self.num_classes = int(student.info.get("num_classes") or 0)
        self.has_uncond = self.num_classes == 0 or self.null_class_label is not None
        self.name, self.hash = name, content_hash
        self.parent_teacher_hash = student.info.get("teacher_hash")
        self.root_teacher, self.root_teacher_hash = root_teacher(student.info)

    def _denoise(self, x, t, cond):
        return self.student(x, t, cond)

    def sampling_timesteps(self, steps: int) -> torch.Tensor:
        return self.student.sampling_timesteps(steps)

    def to(self, *args, **kwargs) -> "StudentTeacher":
        self.student.to(*args, **kwargs)
        return self


def load_student_teacher(path: str | Path) -> StudentTeacher:
    from students import load_student

    path = Path(path)
    student = load_student(path)
    if not student.info.get("data_shape"):
        raise ValueError(f"student file {str(path)!r} records no data_shape; it cannot act as a teacher")
    return StudentTeacher(student, name=f"student:{path}", content_hash=file_sha256(path))
