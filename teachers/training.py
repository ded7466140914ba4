"""Teacher training: a diffusers UNet2DModel (images) or ToyMLP (2-D toys) on the discrete VP process.

Epsilon, sample or v prediction; class-conditional with label dropout so one model also serves unconditional
sampling and classifier-free guidance; EMA; atomic checkpoints and exact resume. The run is the ``diffusion``
objective (``distill.objectives.diffusion``) in the project's one training loop (``distill.engine.train``): this module
maps the teacher config onto a run config, supplies the untrained network, and at the end saves the EMA
weights as a diffusers pipeline folder that both ``teachers.load_teacher`` and diffusers accept.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from distill.core.atomic import write_folder, write_text
from distill.core.param import PREDICTION_TYPES
from distill.core.schedules import BETA_SCHEDULES, DiscreteVP
from distill.data import load_dataset
from distill.engine.config import from_dict, merge, read_yaml

ARCHS = ("unet", "mlp")


@dataclass
class TeacherConfig:
    dataset: str = "mnist16"  # a name for distill.data.load_dataset
    dataset_options: dict = field(default_factory=dict)  # split; hf: datasets: name, image_column, label_column, resolution, channels
    arch: str = "unet"  # unet (diffusers UNet2DModel) | mlp (teachers.toy_mlp.ToyMLP)
    model: dict = field(default_factory=dict)  # keyword arguments of the model class
    prediction_type: str = "v_prediction"  # epsilon | sample | v_prediction
    beta_schedule: str = "squaredcos_cap_v2"  # linear | scaled_linear | squaredcos_cap_v2
    num_train_timesteps: int = 1000
    class_conditional: bool = True  # adds a null class (label dropout) when the dataset has labels
    label_dropout: float = 0.1  # probability of training a sample as unconditional
    batch_size: int = 128
    lr: float = 5e-4
    warmup_steps: int = 200
    max_steps: int = 8000
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 50
    seed: int = 0
    mixed_precision: str | None = None  # no | fp16 | bf16; null: the launcher's (accelerate launch --mixed_precision)
    log_with: list = field(default_factory=list)  # accelerate trackers (tensorboard, wandb, ...), as a run config's
    output_dir: str = "runs/teacher"

    def validate(self) -> None:
        choices = {"arch": ARCHS, "prediction_type": PREDICTION_TYPES[:3], "beta_schedule": BETA_SCHEDULES,
                   "mixed_precision": (None, "no", "fp16", "bf16")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"config key {key!r} is {getattr(self, key)!r}; allowed: {', '.join(map(str, allowed))}")
        for key in ("batch_size", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "num_train_timesteps"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r} must be at least 1, got {getattr(self, key)}")
        if not 0 <= self.label_dropout < 1 or not 0 <= self.ema_decay < 1 or self.lr <= 0:
            raise ValueError("label_dropout and ema_decay must lie in [0, 1) and lr must be positive")


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TeacherConfig:
    """A validated config from YAML plus overrides (read and type-checked as every config: a YAML error names its
    file and line, unknown keys name the allowed ones, ``1e-4`` is a float)."""
    raw = merge(read_yaml(path), overrides or {})  # nested keys (model.*) are merged, not replaced
    cfg = from_dict(TeacherConfig, raw)
    cfg.validate()
    return cfg


def build_model(cfg: TeacherConfig, data_shape: tuple, num_classes: int):
    embeds = num_classes + 1 if (cfg.class_conditional and num_classes) else None  # + the null class
    if cfg.arch == "mlp":
        from teachers.toy_mlp import ToyMLP

        return ToyMLP(dim=data_shape[0], num_class_embeds=embeds, **cfg.model)
    from diffusers import UNet2DModel

    kwargs = {"sample_size": data_shape[1], "in_channels": data_shape[0], "out_channels": data_shape[0], **cfg.model}
    return UNet2DModel(num_class_embeds=embeds, **kwargs)


def save_teacher_folder(model, cfg: TeacherConfig, num_classes: int, out: Path, info: dict) -> None:
    """Write a diffusers pipeline folder atomically: unet/, scheduler/, model_index.json, teacher.json."""
    from diffusers import DDPMScheduler

    library = "diffusers" if type(model).__module__.startswith("diffusers") else type(model).__module__  # ToyMLP: ours
    index = {"_class_name": "DDPMPipeline", "unet": [library, type(model).__name__], "scheduler": ["diffusers", "DDPMScheduler"]}
    meta = {"num_classes": num_classes, "null_class_label": num_classes if (cfg.class_conditional and num_classes) else None,
            "config": dataclasses.asdict(cfg), **info}

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp / "unet")
        DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                      prediction_type=cfg.prediction_type, clip_sample=False).save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps(index, indent=1))
        (tmp / "teacher.json").write_text(json.dumps(meta, indent=1))

    write_folder(out, fill)  # a full disk leaves the old folder and raises OutputWriteError (distill.core.atomic)


class UntrainedTeacher:
    """What the trainer needs of a teacher when there is none yet: the schedule, data shape and classes."""

    def __init__(self, cfg: TeacherConfig, data_shape: tuple, num_classes: int):
        self.schedule = DiscreteVP(cfg.beta_schedule, cfg.num_train_timesteps)
        self.data_shape, self.num_classes, self.prediction_type = tuple(data_shape), num_classes, cfg.prediction_type
        self.name, self.hash = f"untrained:{cfg.dataset}", f"untrained-{cfg.dataset}"


def run_config(cfg: TeacherConfig):
    """The teacher config as a run of the ``diffusion`` objective (same keys, same meaning)."""
    from distill.engine.run_config import OptimConfig, RunConfig, StudentConfig

    return RunConfig(teacher=f"untrained:{cfg.dataset}", objective={"name": "diffusion", "label_dropout": cfg.label_dropout,
                                                                     "space": "raw"},
                     student=StudentConfig(arch="teacher", prediction_type=cfg.prediction_type, parameterization="denoiser",
                                           class_conditional=cfg.class_conditional, sampler="ode"),
                     dataset=cfg.dataset, dataset_options=dict(cfg.dataset_options),
                     optim=OptimConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, lr_schedule="cosine"),
                     batch_size=cfg.batch_size, max_steps=cfg.max_steps, ema_decay=cfg.ema_decay, grad_clip=cfg.grad_clip,
                     mixed_precision=cfg.mixed_precision, log_with=list(cfg.log_with), checkpoint_every=cfg.checkpoint_every,
                     keep_checkpoints=cfg.keep_checkpoints, log_every=cfg.log_every, seed=cfg.seed, output_dir=cfg.output_dir)


RUN_KEYS = {"optim.lr": "lr", "optim.warmup_steps": "warmup_steps", "objective.label_dropout": "label_dropout",
            "student.prediction_type": "prediction_type", "student.class_conditional": "class_conditional",
            "teacher": "dataset"}  # run-config keys of ``run_config`` -> the teacher config's own keys


def check_resume(cfg: TeacherConfig, rcfg, ckpt: Path) -> None:
    """Refuse to resume ``ckpt`` with other settings, naming the teacher config's own keys (the trainer's own refusal
    would name the run config's, e.g. optim.lr, and its remedies, which train_teacher does not take)."""
    from distill.engine.run_files import CONFIG_FILE, RESUME_FREE_KEYS, config_changes, flat

    saved_file = Path(ckpt) / CONFIG_FILE
    if not saved_file.is_file():
        return
    saved, now = yaml.safe_load(saved_file.read_text()), dataclasses.asdict(rcfg)
    saved.setdefault("init_from_sha256", now.get("init_from_sha256"))
    if now.get("mixed_precision") is None:  # the launcher's, resolved by the trainer, whose own check compares it
        now["mixed_precision"] = saved.get("mixed_precision")
    changed = config_changes(saved, now)
    if changed:
        before, after = flat(saved), flat(now)
        shown = ", ".join(f"{RUN_KEYS.get(k, k.split('.')[0] if k.startswith('dataset_options') else k)} "
                          f"({before.get(k)!r} -> {after.get(k)!r})" for k in changed)
        raise ValueError(f"the teacher config differs from the one checkpoint {str(ckpt)!r} was trained with in {shown}; "
                         f"resume with the same settings (only {', '.join(RESUME_FREE_KEYS[1:4])} and --max-steps may change), "
                         "or give another --output-dir (or --no-resume in a new folder)")


def train(cfg: TeacherConfig, resume: bool = True, log=print, stop_at: int | None = None) -> Path | None:
    """Train (or resume) and return the saved teacher folder ``<output_dir>/teacher``.

    ``resume``: continue from the newest complete checkpoint if there is one (False: a folder that has
    checkpoints is refused). ``stop_at`` ends the run early after checkpointing that step (returns None).
    """
    from distill.engine.checkpoint import latest_checkpoint
    from distill.engine.train import train as train_run
    from students.student import Student

    data = load_dataset(cfg.dataset, "train", **cfg.dataset_options)
    num_classes = data.num_classes if cfg.class_conditional else 0
    teacher = UntrainedTeacher(cfg, data.data_shape, num_classes)

    def build(student_cfg, teacher_, lora=None):
        net = build_model(cfg, teacher.data_shape, num_classes)
        return Student(net, schedule=teacher.schedule, prediction_type=cfg.prediction_type, parameterization="denoiser",
                       null_class_label=num_classes or None, sampler="ode",
                       info={"teacher_hash": teacher.hash, "teacher": teacher.name, "data_shape": list(teacher.data_shape),
                             "num_classes": num_classes})

    out = Path(cfg.output_dir)
    ckpt = "latest" if resume and latest_checkpoint(out / "checkpoints") is not None else None
    rcfg = run_config(cfg)
    if ckpt is not None:
        check_resume(cfg, rcfg, latest_checkpoint(out / "checkpoints"))
    if train_run(rcfg, load_teacher=lambda spec: teacher, build_student=build, resume=ckpt, log=log, stop_at=stop_at) is None:
        return None
    write_text(out / "teacher_config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    final = out / "teacher"
    from students import load_student

    ema = load_student(out / ("student_ema.safetensors" if cfg.ema_decay is not None else "student.safetensors"))
    save_teacher_folder(ema.net, cfg, num_classes, final, {"steps": cfg.max_steps, "dataset": cfg.dataset})
    log(f"saved teacher to {final}")
    return final
