"""Teacher training: a run config with ``teacher: untrained``, the ``diffusion`` objective on a fresh network.

A teacher config is a run config like every other (``configs/teachers/*.yaml``): the network is the ``student``
block (``arch: unet`` for a diffusers UNet2DModel, ``toy_mlp`` for 2-D toys), its prediction type
``student.prediction_type``, the discrete VP schedule ``objective.beta_schedule`` / ``objective.num_train_timesteps``,
class conditioning ``student.class_conditional`` with ``objective.label_dropout`` (so one model also serves
unconditional sampling and classifier-free guidance). The run is the project's one training loop
(``distill.engine.train``), so it takes every run key (``optim``, ``mixed_precision``, ``log_with``, ``threads`` ...) and
resumes exactly; this module supplies the untrained teacher (schedule, data shape, classes) and at the end saves the
EMA weights as a diffusers pipeline folder ``<output_dir>/teacher`` that both ``teachers.load_teacher`` and diffusers
accept. ``scripts/train_teacher.py`` and ``scripts/distill.py`` both run it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from distill.core.atomic import write_folder
from distill.core.param import PREDICTION_TYPES
from distill.core.schedules import DiscreteVP
from distill.data import load_dataset
from distill.engine.config import ConfigError

UNTRAINED = "untrained"  # the run config's teacher spec of a teacher run
ARCHS = ("unet", "toy_mlp")  # toy_mlp: teachers.toy_mlp.ToyMLP, which diffusers saves and loads
SCHEDULE_DEFAULTS = {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000}


def is_teacher_run(cfg) -> bool:
    return cfg.teacher == UNTRAINED


def check_config(cfg) -> None:
    """Refuse, in one sentence, a run config that cannot train a teacher folder."""
    s = cfg.student
    rules = [(cfg.objective["name"] == "diffusion", f"objective.name is {cfg.objective['name']!r}; allowed: diffusion"),
             (s.arch in ARCHS, f"student.arch is {s.arch!r}; allowed: {', '.join(ARCHS)}"),
             (s.prediction_type in PREDICTION_TYPES[:3],
              f"student.prediction_type is {s.prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES[:3])}"),
             (s.parameterization == "denoiser", f"student.parameterization is {s.parameterization!r}; allowed: denoiser"),
             (s.sampler == "ode", f"student.sampler is {s.sampler!r}; allowed: ode"),
             (bool(cfg.dataset), "config key 'dataset' is required (the data the teacher learns)"),
             (cfg.lora is None and cfg.adversarial is None and cfg.trajectories is None,
              "config keys 'lora', 'adversarial' and 'trajectories' must be null (a teacher trains all its weights on data)")]
    for ok, problem in rules:
        if not ok:
            raise ConfigError(f"a teacher run (teacher: {UNTRAINED}) trains a diffusers folder: {problem}")


class UntrainedTeacher:
    """What the trainer needs of a teacher when there is none yet: the schedule, data shape and classes."""

    untrained = True  # the diffusion objective reads its schedule options only for such a teacher

    def __init__(self, cfg, data_shape: tuple, num_classes: int):
        o = cfg.objective
        self.beta_schedule = o.get("beta_schedule") or SCHEDULE_DEFAULTS["beta_schedule"]
        self.num_train_timesteps = o.get("num_train_timesteps") or SCHEDULE_DEFAULTS["num_train_timesteps"]
        self.schedule = DiscreteVP(self.beta_schedule, self.num_train_timesteps)
        self.data_shape, self.num_classes, self.prediction_type = tuple(data_shape), num_classes, cfg.student.prediction_type
        self.name, self.hash = f"{UNTRAINED}:{cfg.dataset}", f"{UNTRAINED}-{cfg.dataset}"


def untrained_teacher(cfg) -> UntrainedTeacher:
    check_config(cfg)
    data = load_dataset(cfg.dataset, "train", **cfg.dataset_options)
    return UntrainedTeacher(cfg, data.data_shape, data.num_classes if cfg.student.class_conditional else 0)


def save_teacher_folder(model, cfg, teacher: UntrainedTeacher, out: Path, info: dict) -> None:
    """Write a diffusers pipeline folder atomically: unet/, scheduler/, model_index.json, teacher.json."""
    from diffusers import DDPMScheduler

    library = "diffusers" if type(model).__module__.startswith("diffusers") else type(model).__module__  # ToyMLP: ours
    index = {"_class_name": "DDPMPipeline", "unet": [library, type(model).__name__], "scheduler": ["diffusers", "DDPMScheduler"]}
    k = teacher.num_classes
    meta = {"num_classes": k, "null_class_label": k if k else None, "config": dataclasses.asdict(cfg), **info}

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp / "unet")
        DDPMScheduler(num_train_timesteps=teacher.num_train_timesteps, beta_schedule=teacher.beta_schedule,
                      prediction_type=teacher.prediction_type, clip_sample=False).save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps(index, indent=1))
        (tmp / "teacher.json").write_text(json.dumps(meta, indent=1))

    write_folder(out, fill)  # a full disk leaves the old folder and raises OutputWriteError (distill.core.atomic)


def train(cfg, resume: str | None = "latest", log=print, stop_at: int | None = None) -> Path | None:
    """Train (or resume) the teacher run ``cfg`` (a RunConfig with ``teacher: untrained``) and return the saved
    teacher folder ``<output_dir>/teacher``.

    ``resume``: a checkpoint path, ``"latest"`` (the newest complete checkpoint if there is one), or None (a folder that
    has checkpoints is refused). ``stop_at`` ends the run early after checkpointing that step (returns None).
    """
    from distill.engine.checkpoint import latest_checkpoint
    from distill.engine.train import train as train_run
    from students import build_student, load_student

    teacher = untrained_teacher(cfg)
    out = Path(cfg.output_dir)
    if resume == "latest" and latest_checkpoint(out / "checkpoints") is None:
        resume = None  # nothing to resume: a fresh run
    if train_run(cfg, load_teacher=lambda spec: teacher, build_student=build_student, resume=resume, log=log,
                 stop_at=stop_at) is None:
        return None
    ema = load_student(out / ("student_ema.safetensors" if cfg.ema_decay is not None else "student.safetensors"))
    final = out / "teacher"
    save_teacher_folder(ema.net, cfg, teacher, final, {"steps": cfg.max_steps, "dataset": cfg.dataset})
    log(f"saved teacher to {final}")
    return final
