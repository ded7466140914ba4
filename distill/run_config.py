"""The distillation run config: typed, validated, saved as ``config.yaml`` in the run folder.

Top-level keys are ``RunConfig`` fields; ``objective`` holds ``name`` plus the options of that objective
(its ``Options`` dataclass, validated the same way). Example: ``configs/distill/cd_ring8.yaml``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from distill.config import ConfigError, at_least, choice, from_dict, merge, read_yaml
from distill.grids import GRIDS
from distill.param import PREDICTION_TYPES

STUDENT_ARCHS = ("teacher", "mlp", "unet")  # teacher: a copy of the teacher's network (diffusers teachers)


@dataclass
class StudentConfig:
    arch: str = choice("teacher", STUDENT_ARCHS)  # teacher (copy of its network) | mlp | unet
    model: dict = field(default_factory=dict)  # keyword arguments of the mlp / unet network
    prediction_type: str = choice("sample", PREDICTION_TYPES)  # output of a fresh network (a copy keeps the teacher's)
    parameterization: str = choice("consistency", ("consistency", "denoiser"))  # boundary condition or plain D
    sigma_data: float = at_least(0.5, 1e-6)  # sigma_data of c_skip / c_out
    sampling_grid: str = choice("karras", GRIDS)  # spacing of the default 1-4 step sampling times
    class_conditional: bool = False  # pass dataset labels to teacher and student


@dataclass
class LoraSettings:
    rank: int = at_least(8, 1)
    alpha: float = at_least(8.0, 1e-6)
    target_modules: list = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])


@dataclass
class OptimConfig:
    lr: float = at_least(1e-4, 0.0)
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = at_least(0.0, 0.0)
    warmup_steps: int = at_least(0, 0)
    lr_schedule: str = choice("constant", ("constant", "cosine"))  # after warmup


@dataclass
class RunConfig:
    teacher: str = ""  # teachers.load_teacher spec: gmm:ring8, mnist16, a diffusers folder
    objective: dict = field(default_factory=lambda: {"name": "consistency"})  # name + that objective's options
    student: StudentConfig = field(default_factory=StudentConfig)
    lora: LoraSettings | None = None  # train a LoRA adapter on the student instead of all its weights
    dataset: str | None = None  # distill.data name, for objectives that need real data
    trajectories: str | None = None  # a trajectory cache folder, for objectives that need one
    optim: OptimConfig = field(default_factory=OptimConfig)  # defaults of every network's optimizer group
    batch_size: int = at_least(64, 1)  # global batch (split over processes)
    max_steps: int = at_least(1000, 1)
    ema_decay: float | None = at_least(0.999, 0.0, 1.0)  # EMA of the student for export (--ema); null: none
    grad_clip: float | None = at_least(1.0, 0.0)  # max global grad norm per network; null: no clipping
    mixed_precision: str = choice("no", ("no", "fp16", "bf16"))
    checkpoint_every: int = at_least(500, 1)
    keep_checkpoints: int = at_least(2, 1)
    log_every: int = at_least(50, 1)
    seed: int = 0
    tensorboard: bool = False  # also write TensorBoard scalars to <output_dir>/tensorboard (needs tensorboard)
    output_dir: str = "runs/distill"
    debug_nan_step: int | None = None  # debug: make the loss non-finite at this step (tests the guard)


def load_run_config(path: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """YAML + overrides -> a validated RunConfig whose ``objective`` dict has every option filled in."""
    base, overrides = read_yaml(path), overrides or {}
    new_name = (overrides.get("objective") or {}).get("name")
    if new_name is not None and new_name != (base.get("objective") or {}).get("name"):
        base = {**base, "objective": {}}  # another objective: the file's options do not apply
    raw = merge(base, overrides)
    cfg = from_dict(RunConfig, raw)
    cfg.objective = objective_options_dict(cfg.objective)
    if not cfg.teacher:
        raise ConfigError("config key 'teacher' is required (a gmm:<preset> spec, a zoo name or a diffusers folder)")
    return cfg


def objective_options(objective: dict):
    """(objective class, validated Options instance) for the config's ``objective`` mapping."""
    from distill.objectives import OBJECTIVES

    if objective.get("name") not in OBJECTIVES:
        raise ConfigError(f"config key 'objective.name' is {objective.get('name')!r}; allowed: {', '.join(sorted(OBJECTIVES))}")
    cls = OBJECTIVES[objective["name"]]
    options = {k: v for k, v in objective.items() if k != "name"}
    return cls, from_dict(cls.Options, options, "objective.")


def objective_options_dict(objective: dict) -> dict:
    cls, options = objective_options(objective)
    return {"name": cls.name, **dataclasses.asdict(options)}
