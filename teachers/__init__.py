"""Teachers: any pretrained model presented through the denoiser contract.

``load_teacher(spec)`` accepts
  * ``gmm:<preset>`` or ``gmm:<preset>@<schedule>``: an analytic Gaussian mixture (presets in
    ``teachers.gmm.PRESETS``; schedules in ``distill.schedules.SCHEDULES``, default ``vp_linear``);
  * a path to a local diffusers folder (see ``teachers.diffusers_folder``).
"""

from __future__ import annotations

from pathlib import Path

from distill.denoisers import classifier_free_guidance
from teachers.base import Teacher
from teachers.diffusers_folder import DiffusersTeacher, load_diffusers_teacher
from teachers.gmm import PRESETS as GMM_PRESETS
from teachers.gmm import GaussianMixtureTeacher, load_gmm

__all__ = ["Teacher", "GaussianMixtureTeacher", "DiffusersTeacher", "load_teacher", "classifier_free_guidance",
           "GMM_PRESETS"]


def load_teacher(spec: str | Path, schedule=None) -> Teacher:
    """Load a teacher from a spec string (see the module doc); ``schedule`` overrides a gmm schedule."""
    spec_str = str(spec)
    if spec_str.startswith("gmm:"):
        preset, _, sched = spec_str[len("gmm:"):].partition("@")
        return load_gmm(preset, schedule or sched or None)
    if Path(spec_str).exists():
        return load_diffusers_teacher(spec_str)
    raise FileNotFoundError(
        f"teacher {spec_str!r} is neither gmm:<preset> (presets: {', '.join(GMM_PRESETS)}) nor an existing "
        "diffusers folder"
    )
