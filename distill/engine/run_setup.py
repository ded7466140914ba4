"""Everything the trainer builds before its first step (``distill.engine.train`` runs the loop): the accelerator
(DeepSpeed configured), trackers, the objective, each network's resolved settings and optimizer, the teacher, student,
cache and data, all gathered in a ``Run``.

Per-network settings (lr, betas, weight decay, warm-up, schedule, clipping, update frequency, parameter groups)
resolve as: config ``networks.<name>``, then the objective's ``Network`` declaration, then ``optim`` (and the
top-level ``grad_clip``).

DeepSpeed (configs/accelerate/deepspeed_zero2.yaml): accelerate prepares only one trained model per
Accelerator under DeepSpeed, so only the student is prepared; the teacher, the EMA and objective helpers are
moved to the device by hand (as the diffusers LCM scripts do). Objectives with several trained networks are
refused under DeepSpeed.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from distill.core.conditioning import takes_prompts
from distill.engine.checkpoint import complete_checkpoints
from distill.engine.config import ConfigError, LaunchError
from distill.engine.launch import launch_warning
from distill.engine.paths import file_sha256
from distill.engine.run_config import NetworkOptim, RunConfig, adversarial_options, objective_options
from distill.objectives.base import Context, Network, Objective, unwrap

NETWORKS_FILE = "networks.safetensors"  # the trained networks other than the student, and the objective's helpers


def check_world_size(num_processes: int, environ=os.environ) -> None:
    """Fail when accelerate sees another world size than the launcher started (FACTS.md: without cpu=True
    two processes can each believe they are rank 0 of 1)."""
    launched = int(environ.get("WORLD_SIZE", 1))
    if num_processes != launched:
        raise RuntimeError(f"accelerate sees {num_processes} process(es) but {launched} were launched (WORLD_SIZE)")


def check_deepspeed_processes(deepspeed: bool, environ=os.environ) -> None:
    """DeepSpeed on a machine without a GPU runs one process (its CPU accelerator; accelerate's DeepSpeed path starts
    no CPU process group): a launch of more, such as the shipped deepspeed_zero2.yaml's 8, is refused in one sentence."""
    launched = int(environ.get("WORLD_SIZE", 1))
    if deepspeed and launched > 1 and not torch.cuda.is_available():
        raise LaunchError(f"DeepSpeed on a machine without a GPU runs one process, but the launch started {launched} "
                          f"(WORLD_SIZE); add --num_processes 1 to accelerate launch, or for several CPU processes without "
                          f"DeepSpeed use configs/accelerate/cpu_2proc.yaml")


@dataclass
class NetSettings:
    """One network's resolved optimizer settings (see the module doc for the order of precedence)."""

    lr: float
    betas: tuple[float, float]
    weight_decay: float
    warmup_steps: int
    lr_schedule: str
    grad_clip: float | None
    every: int
    offset: int
    param_groups: list[dict]


@dataclass
class Run:
    """Everything the loop touches, built once by ``setup``."""

    cfg: RunConfig
    accelerator: object
    objective: Objective
    specs: list[Network]
    nets: dict[str, nn.Module]  # as prepared by accelerate
    opts: dict[str, torch.optim.Optimizer]
    settings: dict[str, NetSettings]
    trainable: dict[str, list[nn.Parameter]]
    ema: nn.Module | None
    out: Path
    ctx: Context | None = None
    data: object = None  # distill.data.IndexedData
    cache: object = None
    trackers: bool = False  # accelerate trackers initialised (log_with / tensorboard)
    last_checkpoint: Path | None = None
    lock: object = None  # the run folder's distill.engine.lock.FolderLock, held while the run writes it
    history: dict[str, list] = field(default_factory=dict)


# -- setup --------------------------------------------------------------------------------------------
def make_accelerator(cfg: RunConfig, find_unused_parameters: bool = False):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    # a loss that leaves trained parameters unused on some steps (a GAN head off during warm-up) must say so to
    # DDP, or the next step fails with "Expected to have finished reduction in the prior iteration"
    find_unused = find_unused_parameters if cfg.ddp.find_unused_parameters is None else cfg.ddp.find_unused_parameters
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused, static_graph=cfg.ddp.static_graph)
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    check_deepspeed_processes(deepspeed)  # before the accelerator: every rank stops at once, none waits for the others
    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "tensorboard"))
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available() and not deepspeed,
                              kwargs_handlers=[ddp], log_with=trackers(cfg) or None, project_config=project)
    check_world_size(accelerator.num_processes)
    warning = launch_warning(accelerator.num_processes)
    if warning and accelerator.is_main_process:
        print(warning, flush=True)
    cfg.mixed_precision = str(accelerator.mixed_precision)  # the launcher's when the config left it null
    warning = bf16_warning(cfg.mixed_precision, accelerator.device)
    if warning and accelerator.is_main_process:
        print(warning, flush=True)
    if deepspeed and accelerator.state.deepspeed_plugin is None:
        raise ConfigError("the launch asked for DeepSpeed but accelerate did not set it up (is deepspeed installed? "
                          "pip install -e '.[deepspeed]'); refusing to run without it")
    chunks = accelerator.num_processes * cfg.gradient_accumulation_steps
    if cfg.batch_size % chunks:
        raise ConfigError(f"config key 'batch_size' ({cfg.batch_size}) must be divisible by the {accelerator.num_processes} "
                          f"process(es) x {cfg.gradient_accumulation_steps} gradient accumulation step(s)")
    if accelerator.state.deepspeed_plugin is not None:
        configure_deepspeed(cfg, accelerator)
    return accelerator


def bf16_warning(mixed_precision: str, device: torch.device) -> str | None:
    """A sentence when bf16 autocast runs on a CPU without bf16 instructions (avx512_bf16 / AMX): there oneDNN emulates
    bf16 matrix products and convolutions, 50-80x slower than float32 on an AVX2 EPYC (a cd_mnist16 step 5-20x slower,
    results/engine/compile.md). The run goes on: it is correct, only slow."""
    if mixed_precision != "bf16" or device.type != "cpu" or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return ("mixed_precision bf16 on a CPU without bf16 instructions (avx512_bf16 / AMX): bf16 matrix products and "
            "convolutions are emulated and run many times slower than float32; mixed_precision: no is faster here")


def configure_deepspeed(cfg: RunConfig, accelerator) -> None:
    """DeepSpeed needs the micro-batch size (we feed no DataLoader) and does its own accumulation: ours is refused."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if cfg.gradient_accumulation_steps != 1 or ds.get("gradient_accumulation_steps", 1) not in (1, "auto"):
        raise ConfigError("under DeepSpeed set gradient_accumulation_steps to 1 in both the run config and the DeepSpeed "
                          "config (raise batch_size or the number of processes instead)")
    ds["gradient_accumulation_steps"] = 1
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size // accelerator.num_processes


def trackers(cfg: RunConfig) -> list[str]:
    """The accelerate trackers the config asks for (``log_with`` plus ``tensorboard: true``), each checked to be known
    to accelerate and installed: accelerate itself only warns about a missing package and runs on untracked."""
    import importlib.util

    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    names = list(dict.fromkeys([*cfg.log_with, *(["tensorboard"] if cfg.tensorboard else [])]))
    installed = [n for n in sorted(LOGGER_TYPE_TO_CLASS) if importlib.util.find_spec(n) is not None]  # module = tracker name
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"config key 'log_with' names {name!r}; allowed: {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
        if name in installed:
            continue
        if name == "tensorboard" and cfg.tensorboard and "tensorboard" not in cfg.log_with:
            raise ConfigError("config key 'tensorboard' is true but the tensorboard package is not installed "
                              "(pip install -e '.[tensorboard]', or set tensorboard: false)")
        raise ConfigError(f"config key 'log_with' names {name!r} but the {name} package is not installed (pip install "
                          f"{name.replace('_', '-')}); allowed trackers, installed here: {', '.join(installed) or 'none'}")
    return names


def check_trackers(cfg: RunConfig) -> None:
    """Refuse unknown or uninstalled trackers before any work (``trackers`` raises the ``ConfigError``)."""
    trackers(cfg)


check_tensorboard = check_trackers  # its former name, for callers from before log_with


def build_objective(cfg: RunConfig, ctx: Context) -> Objective:
    from distill.objectives.adversarial import with_adversarial

    cls, options = objective_options(cfg.objective)
    objective = cls(options, ctx)
    objective = with_adversarial(objective, None if cfg.adversarial is None else adversarial_options(cfg.adversarial), ctx)
    if "data" in objective.needs and not cfg.dataset:
        raise ConfigError(f"objective {cls.name!r} needs real data: set config key 'dataset' (a distill.data name)")
    if "trajectories" in objective.needs and ctx.cache is None:
        raise ConfigError(f"objective {cls.name!r} needs a trajectory cache: set config key 'trajectories'")
    if cfg.gradient_accumulation_steps > 1 and not cls.supports_accumulation:
        raise ConfigError(f"objective {cls.name!r} needs whole batches: set config key 'gradient_accumulation_steps' to 1 "
                          f"(or raise batch_size on fewer processes)")
    return objective


DEFAULT_BETAS = (0.9, 0.999)  # Adam's, for networks whose objective declares no reference betas


def resolve_settings(cfg: RunConfig, spec: Network) -> NetSettings:
    """Config ``networks.<name>`` > the objective's declaration > ``optim`` / ``grad_clip``; for betas and weight decay, a
    value the config gives (``networks.<name>``, then ``optim``) > the objective's reference (its released code's) >
    DEFAULT_BETAS / 0."""
    over, o = cfg.networks.get(spec.name) or NetworkOptim(), cfg.optim

    def pick(key, *fallbacks):
        for value in (getattr(over, key, None), *fallbacks):
            if value is not None:
                return value
        return None

    return NetSettings(lr=pick("lr", spec.lr, o.lr), betas=tuple(pick("betas", o.betas, spec.betas) or DEFAULT_BETAS),
                       weight_decay=pick("weight_decay", o.weight_decay, spec.weight_decay) or 0.0,
                       warmup_steps=pick("warmup_steps", o.warmup_steps), lr_schedule=pick("lr_schedule", o.lr_schedule),
                       grad_clip=pick("grad_clip", spec.grad_clip, cfg.grad_clip), every=pick("every", spec.every),
                       offset=pick("offset", spec.offset),
                       param_groups=[dataclasses.asdict(g) for g in over.param_groups] + list(spec.param_groups))


def make_optimizer(settings: NetSettings, named: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
    """AdamW over ``named`` parameters: each in the first parameter group whose ``match`` is in its name, else in
    the network's default group."""
    groups = [{"params": [], "lr": settings.lr, "weight_decay": settings.weight_decay}]
    groups += [{"params": [], "lr": settings.lr if g.get("lr") is None else g["lr"],
                "weight_decay": settings.weight_decay if g.get("weight_decay") is None else g["weight_decay"]}
               for g in settings.param_groups]
    for pname, param in named:
        hit = next((k + 1 for k, g in enumerate(settings.param_groups) if g["match"] in pname), 0)
        groups[hit]["params"].append(param)
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)


def _check_specs(cfg: RunConfig, specs: list[Network], helpers: dict, accelerator) -> None:
    names = [s.name for s in specs]
    if not specs or names[0] != "student" or len(set(names)) != len(names):
        raise ValueError(f"an objective must declare distinct network names, the student first; got {names}")
    unknown = sorted(set(cfg.networks) - set(names))
    if unknown:
        raise ConfigError(f"config key 'networks' names {unknown}, which this objective does not train; allowed: {', '.join(names)}")
    missing = sorted(set(cfg.init_also) - set(names) - set(helpers))
    if missing:
        raise ConfigError(f"config key 'init_also' names {missing}; allowed: {', '.join(n for n in [*names, *helpers] if n != 'student')}")
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED and len(specs) > 1:
        raise ValueError(f"DeepSpeed prepares one trained model per Accelerator; this objective trains {names}")


def weight_dtype(cfg: RunConfig) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)


def resolve_parent(cfg: RunConfig, resuming: bool) -> Path | None:
    """The student file named by ``init_from`` (a file or run folder), its hash checked or recorded in the config."""
    if cfg.init_from is None or resuming:  # a resumed run's weights come from its checkpoint
        return None
    from distill.engine.export import resolve_student_file

    path = resolve_student_file(cfg.init_from)
    digest = file_sha256(path)
    if cfg.init_from_sha256 is not None and cfg.init_from_sha256 != digest:
        raise ConfigError(f"config key 'init_from_sha256' is {cfg.init_from_sha256}, but {str(path)!r} has sha256 {digest}")
    cfg.init_from_sha256 = digest
    return path


def load_init_also(run: Run, names: list[str]) -> None:
    """Other networks and helpers of the ``init_from`` run folder (its ``networks.safetensors``)."""
    from safetensors.torch import load_file

    folder = Path(run.cfg.init_from)
    found = [p for p in (folder / NETWORKS_FILE, *(c / NETWORKS_FILE for c in reversed(complete_checkpoints(folder / "checkpoints"))))
             if p.is_file()]
    if not found:
        raise ConfigError(f"config key 'init_also' needs a run folder with {NETWORKS_FILE}; {str(folder)!r} has none")
    state = load_file(str(found[0]))
    modules = {**{n: unwrap(m) for n, m in run.nets.items()}, **run.objective.helpers()}
    for name in names:
        part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        if not part:
            raise ConfigError(f"{str(found[0])!r} holds no network {name!r}; it holds: "
                              f"{', '.join(sorted({k.split('.')[0] for k in state}))}")
        modules[name].load_state_dict(part, strict=True)


def make_context(cfg: RunConfig, accelerator, teacher, student, cache) -> Context:
    reducer = lambda value, op: accelerator.reduce(value, reduction=op)  # noqa: E731
    return Context(teacher=teacher, student=student, cache=cache, device=accelerator.device,
                   num_processes=accelerator.num_processes, process_index=accelerator.process_index, reducer=reducer)


HALF_SAFE_NETWORKS = ("UNet2DModel", "UNet2DConditionModel")  # compute their time embedding in float32, then cast


def cast_teacher(cfg: RunConfig, teacher) -> None:
    """Under mixed precision fp16 / bf16 (``teacher_dtype: auto``), cast a frozen diffusers-UNet teacher once to that
    dtype, with a text-to-image teacher's text encoder and VAE unless they are offloaded to the CPU (as diffusers'
    LCM training script casts them). Called after the student and the objective's copies (fake score, targets) were
    made from the float32 weights; the teacher's outputs are returned in the caller's dtype."""
    dtype = weight_dtype(cfg)
    net = getattr(teacher, "unet", None)
    if cfg.teacher_dtype == "auto" and dtype != torch.float32 and type(net).__name__ in HALF_SAFE_NETWORKS:
        teacher.to(dtype=dtype)


def setup(cfg: RunConfig, accelerator, load_teacher, build_student, resuming: bool = False) -> Run:
    teacher = load_teacher(cfg.teacher)
    if cfg.teacher_offload:
        if not takes_prompts(teacher):
            raise ConfigError(f"config key 'teacher_offload' keeps a text-to-image teacher's text encoder and VAE on the "
                              f"CPU, but teacher {cfg.teacher!r} has none")
        teacher.offload_encoders = True
    if hasattr(teacher, "to"):
        teacher.to(accelerator.device)
    parent = resolve_parent(cfg, resuming)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    student = build_student(cfg.student, teacher, cfg.lora, **({"init_from": parent} if parent else {}))
    if parent is not None or (resuming and cfg.init_from):  # a resumed run's file keeps its lineage too
        from distill.engine.export import resolve_student_file

        student.info["lineage"] = {"init_from": str(parent or resolve_student_file(cfg.init_from)), "sha256": cfg.init_from_sha256}
    cache = None
    if cfg.trajectories:
        from distill.engine.trajectories import open_cache

        cache = open_cache(cfg.trajectories, teacher_hash=teacher.hash)
    ctx = make_context(cfg, accelerator, teacher, student, cache)
    objective = build_objective(cfg, ctx)
    cast_teacher(cfg, teacher)
    specs, helpers = objective.networks(), objective.helpers()
    _check_specs(cfg, specs, helpers, accelerator)
    settings = {s.name: resolve_settings(cfg, s) for s in specs}
    for spec in specs:  # the default ``updates`` reads the resolved frequencies
        spec.every, spec.offset = settings[spec.name].every, settings[spec.name].offset
    objective._specs = specs
    ema = copy.deepcopy(student).requires_grad_(False) if cfg.ema_decay is not None else None
    named = {s.name: [(n, p) for n, p in s.module.named_parameters() if p.requires_grad] for s in specs}
    opts = [make_optimizer(settings[s.name], named[s.name]) for s in specs]
    prepared = accelerator.prepare(*[s.module for s in specs], *opts)
    prepared = prepared if isinstance(prepared, (list, tuple)) else [prepared]
    k, names = len(specs), [s.name for s in specs]
    for module in objective.frozen().values():
        module.to(accelerator.device, dtype=weight_dtype(cfg)).requires_grad_(False)
    for module in [*helpers.values(), *([ema] if ema is not None else [])]:
        module.to(accelerator.device)  # checkpointed by distill.engine.run_state, as tensors
    trainable = {name: [p for _, p in named[name]] for name in names}
    run = Run(cfg, accelerator, objective, specs, dict(zip(names, prepared[:k])), dict(zip(names, prepared[k:2 * k])),
              settings, trainable, ema, Path(cfg.output_dir), ctx=ctx, cache=cache)
    if cfg.init_also and not resuming:
        load_init_also(run, cfg.init_also)
    if cfg.compile:  # in place: the same modules and state_dict keys (distill.engine.compile)
        from distill.engine.compile import compile_networks

        compile_networks(run)
    if "data" in objective.needs:
        from distill.data import IndexedData, dataset_for

        # a latent teacher (teachers.sd_pipeline) reads images of its VAE's pixel shape and encodes them per batch
        data = dataset_for(cfg.dataset, getattr(teacher, "image_shape", teacher.data_shape), "train", **cfg.dataset_options)
        if data.data_shape is None:
            raise ConfigError(f"dataset {cfg.dataset!r} holds prompts without images, but objective "
                              f"{cfg.objective['name']!r} needs data samples; use image-caption pairs (hf:<folder or hub "
                              f"name> with dataset_options.text_column) or a prompt-free source")
        run.data = IndexedData(data)
    elif cfg.dataset and takes_prompts(teacher):
        from distill.data import IndexedData, load_dataset

        run.data = IndexedData(load_dataset(cfg.dataset, "train", **cfg.dataset_options))  # only its prompts: batch.cond
    return run
