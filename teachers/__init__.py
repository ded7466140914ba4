"""Teachers: any pretrained model presented through the denoiser contract.

``load_teacher(spec)`` accepts
  * ``gmm:<preset>`` or ``gmm:<preset>@<schedule>``: an analytic Gaussian mixture (presets in
    ``teachers.gmm.PRESETS``; schedules in ``distill.core.schedules.SCHEDULES``, default ``vp_linear``);
  * a zoo name (``mnist16``): a teacher trained by this project and committed under ``teachers/zoo/``;
  * a path to a local diffusers folder (see ``teachers.diffusers_folder``); a text-to-image pipeline folder whose
    unet is a UNet2DConditionModel (Stable Diffusion style) gives a latent, prompt-conditioned teacher
    (``teachers.sd_pipeline``);
  * ``student:<file.safetensors>``: an exported student, so that it can teach the next round
    (``teachers.student_teacher``).
"""

from __future__ import annotations

from pathlib import Path

from distill.core.denoisers import classifier_free_guidance
from teachers.base import Teacher
from teachers.diffusers_folder import DiffusersTeacher, load_diffusers_teacher
from teachers.folders import names_cond_unet
from teachers.gmm import PRESETS as GMM_PRESETS
from teachers.gmm import GaussianMixtureTeacher, load_gmm

ZOO = Path(__file__).resolve().parent / "zoo"
ZOO_TEACHERS = {"mnist16": ZOO / "mnist16"}

__all__ = ["Teacher", "GaussianMixtureTeacher", "DiffusersTeacher", "load_teacher", "classifier_free_guidance",
           "GMM_PRESETS"]


def load_teacher_folder(path: str | Path) -> Teacher:
    """A local diffusers folder: a text-to-image pipeline (``teachers.sd_pipeline``) or a pixel UNet
    (``teachers.diffusers_folder``)."""
    if Path(path).is_dir() and names_cond_unet(Path(path)):
        from teachers.sd_pipeline import load_sd_pipeline_teacher

        return load_sd_pipeline_teacher(path)
    return load_diffusers_teacher(path)


def load_teacher(spec: str | Path, schedule=None) -> Teacher:
    """Load a teacher from a spec string (see the module doc); ``schedule`` overrides a gmm schedule."""
    spec_str = str(spec)
    if spec_str.startswith("student:"):
        from teachers.student_teacher import load_student_teacher

        return load_student_teacher(spec_str[len("student:"):])
    if spec_str.startswith("gmm:"):
        preset, _, sched = spec_str[len("gmm:"):].partition("@")
        return load_gmm(preset, schedule or sched or None)
    if spec_str in ZOO_TEACHERS:
        folder = ZOO_TEACHERS[spec_str]
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"zoo teacher {spec_str!r} is not in {folder}; train it with "
                                    f"scripts/train_teacher.py --config configs/teachers/{spec_str}.yaml")
        teacher = load_teacher_folder(folder)
        teacher.name = spec_str
        return teacher
    if Path(spec_str).exists():
        return load_teacher_folder(spec_str)
    raise FileNotFoundError(
        f"teacher {spec_str!r} is neither gmm:<preset> (presets: {', '.join(GMM_PRESETS)}), a zoo name "
        f"({', '.join(ZOO_TEACHERS)}), student:<file.safetensors>, nor an existing diffusers folder"
    )
