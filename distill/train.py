"""The distillation trainer (DESIGN.md, contract 7): one accelerate loop for every objective.

    python scripts/distill.py --config configs/distill/cd_ring8.yaml [--set key=value ...] [--resume latest]
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/distill.py --config ...

It is the only place that knows about devices, processes, mixed precision, gradient accumulation, checkpoints
and logging. Per step it asks the objective which networks update; for each one it computes the per-sample loss
on each micro-batch, reduces it (mean), backpropagates (scaled under fp16), checks loss and gradient norm are
finite, clips, sets the learning rate of the global step, steps the optimizer, then calls
``objective.after_update``. Networks not being updated have ``requires_grad`` off and are passed unwrapped
(no DDP) while another network's loss is computed.

Per-network settings (lr, betas, weight decay, warm-up, schedule, clipping, update frequency, parameter groups)
resolve as: config ``networks.<name>``, then the objective's ``Network`` declaration, then ``optim`` (and the
top-level ``grad_clip``). Learning rates are a pure function of the global step (``lr_lambda``), whichever
steps a network updates on. A resume whose config differs from the checkpoint's (other than ``max_steps`` and
logging keys) is refused with the differing keys; a new stage from old weights is ``init_from``.

Exact resume: the data order is ``batch_indices(step, ...)`` and all noise comes from
``step_generator(seed, step, rank)``, both pure functions of the step; models, optimizers, schedulers,
the student EMA, the objective's helpers (e.g. an EMA target) and the global RNG go through accelerate's
``save_state`` inside an atomic checkpoint folder (``distill.checkpoint``). A run killed at any moment and
resumed with ``resume="latest"`` ends bit-identical on CPU to one that never stopped.

DeepSpeed (configs/accelerate/deepspeed_zero2.yaml): accelerate prepares only one trained model per
Accelerator under DeepSpeed, so only the student is prepared; the teacher, the EMA and objective helpers are
moved to the device by hand (as the diffusers LCM scripts do). Objectives with several trained networks are
refused under DeepSpeed. DeepSpeed clips gradients itself (``gradient_clipping`` in its config) and steps
inside ``backward``; the gradient-norm check is skipped there, and under fp16 (the loss scaler skips
overflowing steps by design).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn
from tqdm import tqdm

from distill.checkpoint import (
    batch_indices,
    checkpoint_problem,
    complete_checkpoints,
    latest_valid_checkpoint,
    read_manifest,
    save_checkpoint,
    skipped_messages,
    step_generator,
)
from distill.conditioning import takes_prompts
from distill.config import ConfigError
from distill.export import STUDENT_FILE
from distill.launch import launch_warning
from distill.objectives.base import Batch, Context, Network, Objective, ema_update, unwrap
from distill.paths import check_output_dir, file_sha256
from distill.run_config import NetworkOptim, RunConfig, objective_options

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
NETWORKS_FILE = "networks.safetensors"  # the trained networks other than the student, and the objective's helpers


class NonFiniteError(FloatingPointError):
    """A loss or gradient norm was NaN or infinite; the message names the step and the network."""


def check_world_size(num_processes: int, environ=os.environ) -> None:
    """Fail when accelerate sees another world size than the launcher started (FACTS.md: without cpu=True
    two processes can each believe they are rank 0 of 1)."""
    launched = int(environ.get("WORLD_SIZE", 1))
    if num_processes != launched:
        raise RuntimeError(f"accelerate sees {num_processes} process(es) but {launched} were launched (WORLD_SIZE)")


def lr_lambda(warmup_steps: int, max_steps: int, schedule: str) -> Callable[[int], float]:
    """LR factor at a global step: linear warm-up over ``warmup_steps``, then constant, or cosine or linear decay
    to 0 at ``max_steps`` over the steps after the warm-up, as diffusers' ``get_{cosine,linear}_schedule_with_warmup``
    define it. One difference, on purpose: warm-up step s has factor (s + 1) / warmup (diffusers: s / warmup), so
    the first update is not taken at LR 0."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(max(step - warmup_steps, 0) / max(1, max_steps - warmup_steps), 1.0)
        return {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1.0 - progress}.get(schedule, 1.0)

    return factor


# keys a resume may change: the run length and how it is logged and checkpointed
RESUME_FREE_KEYS = ("max_steps", "log_every", "checkpoint_every", "keep_checkpoints", "tensorboard", "log_with", "output_dir",
                    "debug_nan_step")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def config_changes(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between two config dicts, the resume-free keys left out."""
    a, b = _flat(saved), _flat(current)
    free = lambda k: k.split(".")[0] in RESUME_FREE_KEYS or (k == "init_from_sha256" and b.get(k) is None)  # noqa: E731
    return sorted(k for k in set(a) | set(b) if not free(k) and a.get(k) != b.get(k))


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
    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "tensorboard"))
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available() and not deepspeed,
                              kwargs_handlers=[ddp], log_with=trackers(cfg) or None, project_config=project)
    check_world_size(accelerator.num_processes)
    warning = launch_warning(accelerator.num_processes)
    if warning and accelerator.is_main_process:
        print(warning, flush=True)
    cfg.mixed_precision = str(accelerator.mixed_precision)  # the launcher's when the config left it null
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


def configure_deepspeed(cfg: RunConfig, accelerator) -> None:
    """DeepSpeed needs the micro-batch size (we feed no DataLoader) and does its own accumulation: ours is refused."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if cfg.gradient_accumulation_steps != 1 or ds.get("gradient_accumulation_steps", 1) not in (1, "auto"):
        raise ConfigError("under DeepSpeed set gradient_accumulation_steps to 1 in both the run config and the DeepSpeed "
                          "config (raise batch_size or the number of processes instead)")
    ds["gradient_accumulation_steps"] = 1
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size // accelerator.num_processes


def trackers(cfg: RunConfig) -> list[str]:
    """The accelerate trackers the config asks for, each checked to be installed (a clear error otherwise)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    names = list(dict.fromkeys([*cfg.log_with, *(["tensorboard"] if cfg.tensorboard else [])]))
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"config key 'log_with' names {name!r}; allowed: {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
        if not LOGGER_TYPE_TO_CLASS[name].requires_logging_directory and name != "tensorboard":
            continue
        if name == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise ConfigError("config key 'tensorboard' is true but the tensorboard package is not installed "
                                  "(pip install -e '.[tensorboard]', or set tensorboard: false)") from None
    return names


def check_tensorboard(cfg: RunConfig) -> None:
    trackers(cfg)


def build_objective(cfg: RunConfig, ctx: Context) -> Objective:
    cls, options = objective_options(cfg.objective)
    objective = cls(options, ctx)
    if "data" in objective.needs and not cfg.dataset:
        raise ConfigError(f"objective {cls.name!r} needs real data: set config key 'dataset' (a distill.data name)")
    if "trajectories" in objective.needs and ctx.cache is None:
        raise ConfigError(f"objective {cls.name!r} needs a trajectory cache: set config key 'trajectories'")
    if cfg.gradient_accumulation_steps > 1 and not cls.supports_accumulation:
        raise ConfigError(f"objective {cls.name!r} needs whole batches: set config key 'gradient_accumulation_steps' to 1 "
                          f"(or raise batch_size on fewer processes)")
    return objective


def resolve_settings(cfg: RunConfig, spec: Network) -> NetSettings:
    """Config ``networks.<name>`` > the objective's declaration > ``optim`` / ``grad_clip``."""
    over, o = cfg.networks.get(spec.name) or NetworkOptim(), cfg.optim

    def pick(key, *fallbacks):
        for value in (getattr(over, key, None), *fallbacks):
            if value is not None:
                return value
        return None

    return NetSettings(lr=pick("lr", spec.lr, o.lr), betas=tuple(pick("betas", spec.betas, o.betas)),
                       weight_decay=pick("weight_decay", spec.weight_decay, o.weight_decay),
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


def set_learning_rate(opt: torch.optim.Optimizer, settings: NetSettings, step: int, max_steps: int) -> float:
    """Every group's lr at global ``step`` (a pure function of the step); returns the default group's."""
    factor = lr_lambda(settings.warmup_steps, max_steps, settings.lr_schedule)(step)
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] * factor
    return opt.param_groups[0]["lr"]


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
    from distill.export import resolve_student_file

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
        from distill.export import resolve_student_file

        student.info["lineage"] = {"init_from": str(parent or resolve_student_file(cfg.init_from)), "sha256": cfg.init_from_sha256}
    cache = None
    if cfg.trajectories:
        from distill.trajectories import open_cache

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
    checkpointed = [m.to(accelerator.device) for _, m in sorted(helpers.items())]
    if ema is not None:
        checkpointed.insert(0, ema.to(accelerator.device))
    accelerator.register_for_checkpointing(*checkpointed) if checkpointed else None
    trainable = {name: [p for _, p in named[name]] for name in names}
    run = Run(cfg, accelerator, objective, specs, dict(zip(names, prepared[:k])), dict(zip(names, prepared[k:2 * k])),
              settings, trainable, ema, Path(cfg.output_dir), ctx=ctx, cache=cache)
    if cfg.init_also and not resuming:
        load_init_also(run, cfg.init_also)
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


def data_batch(run: Run, idx: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """(x0, cond) of the dataset rows ``idx`` on the device: captions and prompts become the teacher's prompt
    conditioning (text encoder once per prompt, cached by the teacher) and images of a latent teacher its VAE latents.
    For an objective that needs no data (a text-to-image teacher's prompts only: data-free distribution matching), x0
    is None."""
    acc, cfg, teacher = run.accelerator, run.cfg, run.ctx.teacher
    x0, labels = run.data.batch(idx)
    if isinstance(labels, list):
        cond = teacher.encode_prompts(labels).to(acc.device)
    else:
        cond = labels.to(acc.device) if cfg.student.class_conditional else None
    if x0 is None or "data" not in run.objective.needs:
        return None, cond
    x0 = x0.to(acc.device)
    # setup() read a latent teacher's data at its VAE's image shape (dataset_for refuses any other): always encode
    return (teacher.encode_images(x0) if hasattr(teacher, "encode_images") else x0), cond


# -- resume, run files, logging ---------------------------------------------------------------------------
def resolve_resume(out: Path, resume: str | None, log=print) -> Path | None:
    """The checkpoint to resume from: None (fresh run), ``latest`` (the newest valid one; damaged newer ones are
    skipped with a note each) or a checkpoint folder (refused, with the reason, when damaged)."""
    if resume is None:
        if complete_checkpoints(out / "checkpoints") or latest_valid_checkpoint(out / "checkpoints")[1]:
            raise ValueError(f"run folder {str(out)!r} already has checkpoints; resume with --resume latest or "
                             f"choose another --output-dir")
        return None
    if resume == "latest":
        found, skipped = latest_valid_checkpoint(out / "checkpoints")
        for message in skipped_messages(skipped):
            log(message)
        return found
    path = Path(resume)
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"{resume!r} is not a complete checkpoint folder (no manifest.json)")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"checkpoint {resume!r} cannot be resumed: {problem}")
    return path


def check_resume_config(cfg: RunConfig, ckpt: Path | None) -> None:
    """Refuse to resume with another config than the checkpoint's, or past ``max_steps``."""
    if ckpt is None:
        return
    step = read_manifest(ckpt)["step"]
    if step > cfg.max_steps:
        raise ConfigError(f"checkpoint {str(ckpt)!r} is at step {step}, beyond max_steps {cfg.max_steps}; resume with "
                          f"--max-steps {step} or more, or start a new run")
    saved_file = ckpt / CONFIG_FILE
    if not saved_file.is_file():  # checkpoints written before configs were kept in them
        return
    saved = yaml.safe_load(saved_file.read_text())
    if cfg.init_from_sha256 is None:
        cfg.init_from_sha256 = saved.get("init_from_sha256")
    changed = config_changes(saved, dataclasses.asdict(cfg))
    if changed:
        shown = ", ".join(f"{k} ({_flat(saved).get(k)!r} -> {_flat(dataclasses.asdict(cfg)).get(k)!r})" for k in changed)
        raise ConfigError(f"the config differs from the one checkpoint {str(ckpt)!r} was trained with in {shown}; resume "
                          f"with the same config (only {', '.join(RESUME_FREE_KEYS[:4])} may change), or start a new run "
                          f"from its weights with init_from")


def restore(run: Run, ckpt: Path | None, log) -> int:
    if ckpt is None:
        return 0
    run.accelerator.load_state(str(ckpt))
    run.last_checkpoint = ckpt
    step = read_manifest(ckpt)["step"]
    log(f"resumed from {ckpt} at step {step}")
    return step


def open_run_files(run: Run, step: int, log=print) -> None:
    """config.yaml, metrics.jsonl (lines after ``step`` from an interrupted run dropped), TensorBoard."""
    if not run.accelerator.is_main_process:
        if trackers(run.cfg):
            run.accelerator.init_trackers("")  # a no-op off the main process, but every rank must call it
        return
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / CONFIG_FILE).write_text(yaml.safe_dump(dataclasses.asdict(run.cfg), sort_keys=False))
    metrics = run.out / METRICS_FILE
    if metrics.is_file():
        kept = []
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line) if line else None
            except json.JSONDecodeError:  # a partial last line left by a kill
                log(f"note: dropped an unreadable line of {metrics} (a write interrupted by a kill)")
                continue
            if row is not None and row["step"] <= step:
                kept.append(line)
        metrics.write_text("".join(line + "\n" for line in kept))

    names = trackers(run.cfg)
    if names:
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in _flat(dataclasses.asdict(run.cfg)).items()}
        run.accelerator.init_trackers("", config=flat, init_kwargs={"tensorboard": {"purge_step": step + 1}})
        run.trackers = True


def updates_and_seconds(folder: str | Path, up_to: int | None = None, network: str = "student") -> tuple[int, float]:
    """(updates, seconds) of a run folder from its metrics.jsonl: ``network``'s rows, each row's seconds per step times
    the steps since the row before; ``up_to``: only the first that many steps (a checkpoint exported from a longer run).
    A line cut short by a kill is skipped. The cost of a run for ``scripts/run_cost.py`` and progressive rounds."""
    path = Path(folder) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {folder}; pass the run folder a distillation wrote")
    seconds, last = 0.0, 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if row is None or row.get("network") != network:
            continue
        step = row["step"] if up_to is None else min(row["step"], up_to)
        if step > last:  # past up_to, rows add nothing
            seconds += row["seconds_per_step"] * (step - last)
            last = step
    if up_to is not None and last < up_to:
        raise ValueError(f"{folder} logged {last} steps, fewer than the {up_to} asked for")
    return last, seconds


def log_metrics(run: Run, step: int, stats: dict[str, dict], seconds: float, log) -> None:
    for name, values in stats.items():
        run.history.setdefault(name, []).append(values)
    if step % run.cfg.log_every or not run.accelerator.is_main_process:
        return
    with open(run.out / METRICS_FILE, "a") as f:
        for name, rows in run.history.items():
            keys = [k for k in rows[-1] if k != "lr"]  # a component that starts mid-window (a GAN switched on late)
            mean = lambda k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows)  # noqa: E731  is averaged where present
            row = {"step": step, "network": name, **{k: mean(k) for k in keys},
                   "lr": rows[-1]["lr"], "seconds_per_step": seconds, "updates_averaged": len(rows)}
            f.write(json.dumps(row) + "\n")
            parts = " ".join(f"{k} {row[k]:.5g}" for k in keys if k not in ("loss", "grad_norm"))
            log(f"step {step}/{run.cfg.max_steps} {name}: loss {row['loss']:.5f} grad_norm {row['grad_norm']:.3g} "
                f"lr {row['lr']:.2e} {seconds:.3f} s/step" + (f" [{parts}]" if parts else ""))
            if run.trackers:
                run.accelerator.log({f"{name}/{key}": row[key] for key in (*keys, "lr")}, step=step)
    run.history = {}


# -- one step ------------------------------------------------------------------------------------------
def make_batch(run: Run, step: int, micro: int = 0) -> Batch:
    """Micro-batch ``micro`` of this rank at ``step``: chunk ``micro * processes + rank`` of the global batch, noise
    from ``step_generator(seed, step, that chunk)`` (without accumulation: the rank's half, as always)."""
    acc, cfg = run.accelerator, run.cfg
    per = cfg.batch_size // (acc.num_processes * cfg.gradient_accumulation_steps)
    chunk = micro * acc.num_processes + acc.process_index
    batch = Batch(step, step_generator(cfg.seed, step, chunk), acc.device, per)
    if run.data is not None:
        idx = batch_indices(step, cfg.batch_size, len(run.data), cfg.seed)[chunk * per:(chunk + 1) * per]
        batch.x0, batch.cond = data_batch(run, idx)
    if run.cache is not None:
        idx = batch_indices(step, cfg.batch_size, run.cache.num_samples, cfg.seed + 1)[chunk * per:(chunk + 1) * per]
        batch.traj = run.cache.rows(idx, run.objective.cache_keys)
        if batch.cond is None and run.cache.manifest.get("prompts") and "label" in batch.traj:  # prompts by reference
            batch.cond = run.ctx.teacher.encode_prompts(run.cache.prompt_texts(batch.traj["label"])).to(acc.device)
        elif batch.cond is None and cfg.student.class_conditional:
            batch.cond = batch.traj["label"].to(acc.device)
    nets = {n: unwrap(m) for n, m in run.nets.items()}
    for m in nets.values():
        m.eval()
    with torch.no_grad():
        batch = run.objective.prepare(batch, nets)
    for m in nets.values():
        m.train()
    return batch


@contextlib.contextmanager
def only_training(run: Run, name: str):
    """Turn ``requires_grad`` off for the other networks' trainable parameters while ``name`` updates."""
    others = [p for other, params in run.trainable.items() if other != name for p in params]
    for p in others:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in others:
            p.requires_grad_(True)


def check_finite(run: Run, value: torch.Tensor, what: str, name: str, step: int) -> None:
    flag = torch.isfinite(value.detach().float()).all().float().reshape(1).to(run.accelerator.device)
    if run.accelerator.num_processes > 1:
        flag = run.accelerator.gather(flag).min()
    if not bool(flag):
        last = run.last_checkpoint or "none (no checkpoint was written yet)"
        raise NonFiniteError(f"non-finite {what} ({float(value.detach()):g}) at step {step + 1} (counted as in the log) in "
                             f"network {name!r}; the run stopped, its last good checkpoint is {last}")


def split_loss(out) -> tuple[torch.Tensor, dict[str, float]]:
    """(per-sample loss, named components as floats) from what ``Objective.loss`` returned."""
    if isinstance(out, dict):
        parts = {k: float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v) for k, v in out.items() if k != "loss"}
        return out["loss"], parts
    return out, {}


def backward_micro_batches(run: Run, name: str, batches: list[Batch]) -> tuple[torch.Tensor, dict]:
    """Loss of each micro-batch, scaled by 1 / count and backpropagated (gradients synchronised on the last)."""
    acc, total, parts = run.accelerator, 0.0, {}
    nets = {n: (m if n == name else unwrap(m)) for n, m in run.nets.items()}
    for i, batch in enumerate(batches):
        sync = contextlib.nullcontext() if i == len(batches) - 1 else acc.no_sync(run.nets[name])
        with sync:
            per_sample, comp = split_loss(run.objective.loss(name, nets, batch))
            loss = per_sample.mean()
            if run.cfg.debug_nan_step == batch.step:
                loss = loss * float("nan")
            check_finite(run, loss, "loss", name, batch.step)
            acc.backward(loss / len(batches))
        total = total + loss.detach() / len(batches)
        for k, v in comp.items():
            parts[k] = parts.get(k, 0.0) + v / len(batches)
    return total, parts


def update_network(run: Run, name: str, batches: list[Batch]) -> dict:
    acc, cfg, step, settings = run.accelerator, run.cfg, batches[0].step, run.settings[name]
    with only_training(run, name):
        loss, parts = backward_micro_batches(run, name, batches)
    clip = settings.grad_clip if settings.grad_clip is not None else float("inf")
    norm = acc.clip_grad_norm_(run.trainable[name], clip)  # a float or None under DeepSpeed
    norm = None if norm is None else torch.as_tensor(norm, dtype=torch.float32)
    if norm is not None and cfg.mixed_precision != "fp16":
        check_finite(run, norm, "gradient norm", name, step)
    lr = set_learning_rate(run.opts[name], settings, step, cfg.max_steps)
    run.opts[name].step()
    run.opts[name].zero_grad(set_to_none=True)
    run.objective.after_update(name, run.nets, step)
    if name == "student" and run.ema is not None:
        ema_update(run.ema, unwrap(run.nets["student"]), cfg.ema_decay)
    stats = {"loss": loss.detach().float(), **{k: torch.tensor(v) for k, v in parts.items()}}
    if acc.num_processes > 1:  # the logged loss is the global batch's, not rank 0's share
        keys = list(stats)
        means = acc.reduce(torch.stack([stats[k].reshape(()) for k in keys]).to(acc.device), reduction="mean")
        stats = dict(zip(keys, means.cpu()))
    return {**{k: float(v) for k, v in stats.items()}, "grad_norm": float(norm) if norm is not None else float("nan"), "lr": lr}


# -- checkpoints and the end ---------------------------------------------------------------------------
def write_students(run: Run, folder: Path, final: bool) -> None:
    """The student files (LoRA merged at the end, not in checkpoints) and the other networks + helpers."""
    from safetensors.torch import save_file

    cfg_dict = dataclasses.asdict(run.cfg)
    run.objective.save_result(folder, unwrap(run.nets["student"]), run.ema, cfg_dict, final)
    others = {**{n: unwrap(m) for n, m in run.nets.items() if n != "student"}, **run.objective.helpers()}
    if others:
        state = {f"{n}.{k}": v.detach().cpu().contiguous() for n, m in others.items() for k, v in m.state_dict().items()}
        tmp = folder / (NETWORKS_FILE + ".tmp")
        save_file(state, str(tmp))
        os.replace(tmp, folder / NETWORKS_FILE)


def checkpoint(run: Run, step: int) -> None:
    acc = run.accelerator

    def write(folder: Path) -> None:
        acc.save_state(str(folder))  # every rank: per-rank RNG files
        if acc.is_main_process:
            write_students(run, folder, final=False)
            (folder / CONFIG_FILE).write_text(yaml.safe_dump(dataclasses.asdict(run.cfg), sort_keys=False))

    run.last_checkpoint = save_checkpoint(run.out / "checkpoints", step, write, {"kind": "distill", "objective": run.objective.name},
                                          keep=run.cfg.keep_checkpoints, is_main=acc.is_main_process, barrier=acc.wait_for_everyone)


def finish(run: Run, log) -> Path:
    if run.accelerator.is_main_process:
        write_students(run, run.out, final=True)
        log(f"saved {run.out / STUDENT_FILE}")
    if run.trackers:
        run.accelerator.end_training()
    run.accelerator.wait_for_everyone()
    return run.out


# -- the loop --------------------------------------------------------------------------------------------
def start(cfg: RunConfig, load_teacher, build_student, resume: str | None, log) -> tuple[Run, int]:
    """Everything before the first step: checks, accelerator, networks, restore, run files, ``on_start``."""
    check_tensorboard(cfg)
    check_output_dir(cfg.output_dir, "output_dir")
    ckpt = resolve_resume(Path(cfg.output_dir), resume, log)
    cls, _ = objective_options(cfg.objective)
    accelerator = make_accelerator(cfg, cls.find_unused_parameters)
    check_resume_config(cfg, ckpt)
    run = setup(cfg, accelerator, load_teacher, build_student, resuming=ckpt is not None)
    step = restore(run, ckpt, log)
    open_run_files(run, step, log)
    with torch.no_grad():
        run.objective.on_start(run.ctx, step)
    for net in run.nets.values():
        net.train()
    return run, step


def train(cfg: RunConfig, *, load_teacher, build_student, resume: str | None = None, log=print,
          stop_at: int | None = None) -> Path | None:
    """Run (or resume) a distillation and return the run folder; ``stop_at`` ends early after checkpointing
    that step (returns None), as a time budget would. ``load_teacher(spec)`` and ``build_student(student_cfg,
    teacher, lora[, init_from=path])`` come from the caller (scripts/distill.py), so that distill/ imports neither
    package."""
    run, step = start(cfg, load_teacher, build_student, resume, log)
    log(f"rank {run.accelerator.process_index} of {run.accelerator.num_processes}: {cfg.objective['name']} from step "
        f"{step} to {cfg.max_steps}")
    bar = tqdm(total=cfg.max_steps, initial=step, desc=cfg.objective["name"], mininterval=5,
               disable=not run.accelerator.is_main_process)
    while step < cfg.max_steps:
        t0 = time.time()
        batches = [make_batch(run, step, micro) for micro in range(cfg.gradient_accumulation_steps)]
        stats = {name: update_network(run, name, batches) for name in run.objective.updates(step)}
        step += 1
        bar.update(1)
        bar.set_postfix({f"{n}_loss": f"{v['loss']:.4g}" for n, v in stats.items()}, refresh=False)
        log_metrics(run, step, stats, time.time() - t0, log)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            checkpoint(run, step)
        if stop_at is not None and step >= stop_at and step < cfg.max_steps:
            if step % cfg.checkpoint_every:
                checkpoint(run, step)
            bar.close()
            return None
    bar.close()
    return finish(run, log)
