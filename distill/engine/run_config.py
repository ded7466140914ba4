"""The distillation run config: typed, validated, saved as ``config.yaml`` in the run folder.

Top-level keys are ``RunConfig`` fields; ``objective`` holds ``name`` plus the options of that objective
(its ``Options`` dataclass, validated the same way). Example: ``configs/distill/cd_ring8.yaml``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from distill.core.grids import GRIDS
from distill.core.param import PREDICTION_TYPES
from distill.engine.config import ConfigError, at_least, choice, from_dict, merge, read_yaml

# teacher: a copy of the teacher's network (diffusers teachers); toy_mlp: the mlp as a diffusers model (toy teachers)
STUDENT_ARCHS = ("teacher", "mlp", "unet", "toy_mlp")


@dataclass
class StudentConfig:
    arch: str = choice("teacher", STUDENT_ARCHS)  # teacher (copy of its network) | mlp | unet | toy_mlp
    model: dict = field(default_factory=dict)  # keyword arguments of the mlp / unet network
    prediction_type: str = choice("sample", PREDICTION_TYPES)  # output of a fresh network (a copy keeps the teacher's)
    # boundary (student.py) or D; consistency_edm by default since 0.3: ``consistency`` (c_skip + c_out up to 1.25) is
    # biased and stays for the configs of committed students, which load by their recorded parameterization
    parameterization: str = choice("consistency_edm", ("consistency", "consistency_edm", "denoiser"))
    sigma_data: float = at_least(0.5, 1e-6)  # sigma_data of c_skip / c_out
    sampling_grid: str = choice("karras", GRIDS)  # spacing of the default 1-4 step sampling times
    class_conditional: bool = False  # pass dataset labels to teacher and student
    # re-noising steps, deterministic solver steps, or MeanFlow's average-velocity jumps (students/student.py)
    sampler: str = choice("consistency", ("consistency", "ode", "meanflow"))
    sampler_solver: str = "euler"  # the solver of the ode sampler (euler = DDIM)
    sampling_steps: list | None = None  # step counts whose times the student file records; null: 1-4


@dataclass
class LoraSettings:
    rank: int = at_least(8, 1)
    alpha: float = at_least(8.0, 1e-6)
    target_modules: list = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])


LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class OptimConfig:
    lr: float = at_least(1e-4, 0.0)
    betas: list | None = None  # null: each network's reference betas from its objective (docs), else DEFAULT_BETAS
    weight_decay: float | None = at_least(None, 0.0)  # null: each network's reference from its objective, else 0
    warmup_steps: int = at_least(0, 0)
    lr_schedule: str = choice("constant", LR_SCHEDULES)  # after warmup; cosine / linear decay to 0 at max_steps


@dataclass
class ParamGroup:
    match: str = ""  # parameters whose name contains this string (e.g. "conditions." for new embeddings)
    lr: float | None = at_least(None, 0.0)  # null: the network's lr
    weight_decay: float | None = at_least(None, 0.0)  # null: the network's weight decay


@dataclass
class NetworkOptim:
    """Per-network settings under ``networks.<name>``; null keys fall back to the objective's declaration,
    then to ``optim`` / the top-level ``grad_clip``."""

    lr: float | None = at_least(None, 0.0)
    betas: list | None = None
    weight_decay: float | None = at_least(None, 0.0)
    warmup_steps: int | None = at_least(None, 0)
    lr_schedule: str | None = choice(None, (None, *LR_SCHEDULES))
    grad_clip: float | None = at_least(None, 0.0)
    every: int | None = at_least(None, 1)  # update on steps with step % every == offset
    offset: int | None = at_least(None, 0)
    param_groups: list = field(default_factory=list)  # [{match, lr, weight_decay}], first match wins


@dataclass
class DDPSettings:
    """accelerate's DistributedDataParallelKwargs; null: what the objective declares."""

    find_unused_parameters: bool | None = None  # a loss that leaves some parameters unused on some steps
    static_graph: bool = False


@dataclass
class RunConfig:
    teacher: str = ""  # teachers.load_teacher spec: gmm:ring8, mnist16, a diffusers folder; untrained: train one (teachers.training)
    objective: dict = field(default_factory=lambda: {"name": "consistency"})  # name + that objective's options
    student: StudentConfig = field(default_factory=StudentConfig)
    lora: LoraSettings | None = None  # train a LoRA adapter on the student instead of all its weights
    adversarial: dict | None = None  # a GAN head on any objective (distill.objectives.adversarial.AdversarialOptions)
    dataset: str | None = None  # distill.data name, for objectives that need real data
    dataset_options: dict = field(default_factory=dict)  # split; hf: datasets: name, image_column, label_column, resolution, channels
    trajectories: str | None = None  # a trajectory cache folder, for objectives that need one
    optim: OptimConfig = field(default_factory=OptimConfig)  # defaults of every network's optimizer group
    networks: dict = field(default_factory=dict)  # <network name>: NetworkOptim, per-network overrides
    init_from: str | None = None  # a student file or run folder whose student weights start this run (step 0)
    init_from_sha256: str | None = None  # the parent file's hash: filled in at start, checked when given
    init_also: list = field(default_factory=list)  # other networks / helpers taken from an init_from run folder
    gradient_accumulation_steps: int = at_least(1, 1)  # micro-batches per optimizer step (batch_size is per step)
    ddp: DDPSettings = field(default_factory=DDPSettings)
    batch_size: int = at_least(64, 1)  # global batch (split over processes)
    max_steps: int = at_least(1000, 1)
    ema_decay: float | None = at_least(0.999, 0.0, 1.0)  # EMA of the student for export (--ema); null: none
    grad_clip: float | None = at_least(1.0, 0.0)  # max global grad norm per network; null: no clipping
    mixed_precision: str | None = choice(None, (None, "no", "fp16", "bf16"))  # null: the launcher's (accelerate launch --mixed_precision)
    teacher_dtype: str = choice("auto", ("auto", "float32"))  # auto: frozen UNet teacher (+ encoders) in fp16/bf16 under mixed_precision
    teacher_offload: bool = False  # text-to-image teacher: its text encoder and VAE stay on the CPU in float32
    # torch.compile (inductor) the student's, teacher's and the objective's other networks in place; same state_dict keys
    # and files; losses within 1e-4 relative of eager (float sums reordered); a resume may change it (docs/engine.md)
    compile: bool = False
    checkpoint_every: int = at_least(500, 1)
    keep_checkpoints: int = at_least(2, 1)
    log_every: int = at_least(50, 1)
    seed: int = 0
    log_with: list = field(default_factory=list)  # accelerate trackers: tensorboard, wandb, mlflow, ... (main process only)
    tensorboard: bool = False  # shorthand for log_with: [tensorboard] (scalars in <output_dir>/tensorboard)
    output_dir: str = "runs/distill"
    threads: int | None = at_least(None, 1)  # torch intra-op threads per process; null: (usable cores - 1) / processes (distill.core.cores)
    interop_threads: int | None = at_least(None, 1)  # torch inter-op threads per process; null: as threads
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
    if cfg.adversarial is not None:
        cfg.adversarial = dataclasses.asdict(adversarial_options(cfg.adversarial))
    cfg.networks = {name: from_dict(NetworkOptim, value, f"networks.{name}.") if isinstance(value, dict) else value
                    for name, value in cfg.networks.items()}
    for name, net in cfg.networks.items():
        if not isinstance(net, NetworkOptim):
            raise ConfigError(f"config key 'networks.{name}' must be a mapping of optimizer settings, got {net!r}")
        net.param_groups = [from_dict(ParamGroup, g, f"networks.{name}.param_groups.") if isinstance(g, dict) else g
                            for g in net.param_groups]
    if cfg.init_also and not cfg.init_from:
        raise ConfigError("config key 'init_also' needs 'init_from' (a run folder)")
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


def adversarial_options(adversarial: dict):
    """The validated ``AdversarialOptions`` of config ``adversarial``."""
    from distill.objectives.adversarial import AdversarialOptions

    return from_dict(AdversarialOptions, adversarial, "adversarial.")


def objective_options_dict(objective: dict) -> dict:
    cls, options = objective_options(objective)
    return {"name": cls.name, **dataclasses.asdict(options)}
