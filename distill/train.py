"""The distillation trainer (DESIGN.md, contract 7): one accelerate loop for every objective.

    python scripts/distill.py --config configs/distill/cd_ring8.yaml [--set key=value ...] [--resume latest]
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/distill.py --config ...

It is the only place that knows about devices, processes, mixed precision, checkpoints and logging. Per step
it asks the objective which networks update; for each one it computes the per-sample loss, reduces it (mean),
backpropagates (scaled under fp16), checks loss and gradient norm are finite, clips, steps the optimizer and
LR scheduler, then calls ``objective.after_update``. Networks not being updated have ``requires_grad`` off
while another network's loss is computed.

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
from typing import Callable

import torch
import yaml
from torch import nn

from distill.checkpoint import batch_indices, latest_checkpoint, read_manifest, save_checkpoint, step_generator
from distill.config import ConfigError
from distill.export import EMA_FILE, STUDENT_FILE, save_student
from distill.objectives.base import Batch, Network, Objective, ema_update, unwrap
from distill.run_config import RunConfig, objective_options


class NonFiniteError(FloatingPointError):
    """A loss or gradient norm was NaN or infinite; the message names the step and the network."""


def check_world_size(num_processes: int, environ=os.environ) -> None:
    """Fail when accelerate sees another world size than the launcher started (FACTS.md: without cpu=True
    two processes can each believe they are rank 0 of 1)."""
    launched = int(environ.get("WORLD_SIZE", 1))
    if num_processes != launched:
        raise RuntimeError(f"accelerate sees {num_processes} process(es) but {launched} were launched (WORLD_SIZE)")


def lr_lambda(warmup_steps: int, max_steps: int, schedule: str) -> Callable[[int], float]:
    """Linear warmup over ``warmup_steps``, then constant or cosine decay to 0 at ``max_steps``."""

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        return warm * (0.5 * (1 + math.cos(math.pi * min(step / max_steps, 1))) if schedule == "cosine" else 1.0)

    return factor


@dataclass
class Run:
    """Everything the loop touches, built once by ``setup``."""

    cfg: RunConfig
    accelerator: object
    objective: Objective
    specs: list[Network]
    nets: dict[str, nn.Module]  # as prepared by accelerate
    opts: dict[str, torch.optim.Optimizer]
    scheds: dict[str, object]
    trainable: dict[str, list[nn.Parameter]]
    ema: nn.Module | None
    out: Path
    data: tuple[torch.Tensor, torch.Tensor] | None = None
    cache: object = None
    writer: object = None
    last_checkpoint: Path | None = None
    history: dict[str, list] = field(default_factory=dict)


# -- setup --------------------------------------------------------------------------------------------
def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator

    # step_scheduler_with_optimizer=False: the LR schedule counts global steps (accelerate would otherwise
    # step a prepared scheduler once per process per step, running it num_processes times too fast)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                              step_scheduler_with_optimizer=False)
    check_world_size(accelerator.num_processes)
    if cfg.batch_size % accelerator.num_processes:
        raise ConfigError(f"config key 'batch_size' ({cfg.batch_size}) must be divisible by the {accelerator.num_processes} processes")
    return accelerator


def check_tensorboard(cfg: RunConfig) -> None:
    if cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("config key 'tensorboard' is true but the tensorboard package is not installed "
                              "(pip install tensorboard, or set tensorboard: false)") from None


def build_objective(cfg: RunConfig, teacher, student) -> tuple[Objective, object]:
    cache = None
    if cfg.trajectories:
        from distill.trajectories import open_cache

        cache = open_cache(cfg.trajectories, teacher_hash=teacher.hash)
    cls, options = objective_options(cfg.objective)
    objective = cls(options, teacher=teacher, student=student, cache=cache)
    if "data" in objective.needs and not cfg.dataset:
        raise ConfigError(f"objective {cls.name!r} needs real data: set config key 'dataset' (a distill.data name)")
    if "trajectories" in objective.needs and cache is None:
        raise ConfigError(f"objective {cls.name!r} needs a trajectory cache: set config key 'trajectories'")
    return objective, cache


def make_optimizer(cfg: RunConfig, spec: Network, params: list[nn.Parameter]):
    o = cfg.optim
    opt = torch.optim.AdamW(params, lr=spec.lr or o.lr, betas=tuple(spec.betas or o.betas),
                            weight_decay=o.weight_decay if spec.weight_decay is None else spec.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o.warmup_steps, cfg.max_steps, o.lr_schedule))


def _check_specs(specs: list[Network], accelerator) -> None:
    names = [s.name for s in specs]
    if not specs or names[0] != "student" or len(set(names)) != len(names):
        raise ValueError(f"an objective must declare distinct network names, the student first; got {names}")
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED and len(specs) > 1:
        raise ValueError(f"DeepSpeed prepares one trained model per Accelerator; this objective trains {names}")


def setup(cfg: RunConfig, accelerator, load_teacher, build_student) -> Run:
    teacher = load_teacher(cfg.teacher)
    if hasattr(teacher, "to"):
        teacher.to(accelerator.device)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    student = build_student(cfg.student, teacher, cfg.lora)
    objective, cache = build_objective(cfg, teacher, student)
    specs = objective.networks()
    _check_specs(specs, accelerator)
    ema = copy.deepcopy(student).requires_grad_(False) if cfg.ema_decay is not None else None
    trainable = {s.name: [p for p in s.module.parameters() if p.requires_grad] for s in specs}
    pairs = [make_optimizer(cfg, s, trainable[s.name]) for s in specs]
    prepared = accelerator.prepare(*[s.module for s in specs], *[p[0] for p in pairs], *[p[1] for p in pairs])
    prepared = prepared if isinstance(prepared, (list, tuple)) else [prepared]
    k = len(specs)
    names = [s.name for s in specs]
    helpers = [m.to(accelerator.device) for _, m in sorted(objective.helpers().items())]
    if ema is not None:
        helpers.insert(0, ema.to(accelerator.device))
    accelerator.register_for_checkpointing(*helpers) if helpers else None
    run = Run(cfg, accelerator, objective, specs, dict(zip(names, prepared[:k])), dict(zip(names, prepared[k:2 * k])),
              dict(zip(names, prepared[2 * k:])), trainable, ema, Path(cfg.output_dir), cache=cache)
    if "data" in objective.needs:
        from distill.data import dataset_tensors, load_dataset

        run.data = dataset_tensors(load_dataset(cfg.dataset, "train"))
    return run


# -- resume, run files, logging ---------------------------------------------------------------------------
def resolve_resume(out: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: None (fresh run), ``latest`` or a checkpoint folder."""
    if resume is None:
        if latest_checkpoint(out / "checkpoints") is not None:
            raise ValueError(f"run folder {str(out)!r} already has checkpoints; resume with --resume latest or "
                             f"choose another --output-dir")
        return None
    if resume == "latest":
        return latest_checkpoint(out / "checkpoints")
    path = Path(resume)
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"{resume!r} is not a complete checkpoint folder (no manifest.json)")
    return path


def restore(run: Run, ckpt: Path | None, log) -> int:
    if ckpt is None:
        return 0
    run.accelerator.load_state(str(ckpt))
    run.last_checkpoint = ckpt
    step = read_manifest(ckpt)["step"]
    log(f"resumed from {ckpt} at step {step}")
    return step


def open_run_files(run: Run, step: int) -> None:
    """config.yaml, metrics.jsonl (lines after ``step`` from an interrupted run dropped), TensorBoard."""
    if not run.accelerator.is_main_process:
        return
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(run.cfg), sort_keys=False))
    metrics = run.out / "metrics.jsonl"
    if metrics.is_file():
        kept = [line for line in metrics.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        metrics.write_text("".join(line + "\n" for line in kept))
    if run.cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        run.writer = SummaryWriter(str(run.out / "tensorboard"), purge_step=step + 1)


def log_metrics(run: Run, step: int, stats: dict[str, dict], seconds: float, log) -> None:
    for name, values in stats.items():
        run.history.setdefault(name, []).append(values)
    if step % run.cfg.log_every or not run.accelerator.is_main_process:
        return
    with open(run.out / "metrics.jsonl", "a") as f:
        for name, rows in run.history.items():
            row = {"step": step, "network": name, **{k: sum(r[k] for r in rows) / len(rows) for k in ("loss", "grad_norm")},
                   "lr": rows[-1]["lr"], "seconds_per_step": seconds}
            f.write(json.dumps(row) + "\n")
            log(f"step {step}/{run.cfg.max_steps} {name}: loss {row['loss']:.5f} grad_norm {row['grad_norm']:.3g} "
                f"lr {row['lr']:.2e} {seconds:.3f} s/step")
            if run.writer is not None:
                for key in ("loss", "grad_norm", "lr"):
                    run.writer.add_scalar(f"{name}/{key}", row[key], step)
    run.history = {}


# -- one step ------------------------------------------------------------------------------------------
def make_batch(run: Run, step: int) -> Batch:
    acc, cfg = run.accelerator, run.cfg
    per = cfg.batch_size // acc.num_processes
    rank = acc.process_index
    batch = Batch(step, step_generator(cfg.seed, step, rank), acc.device, per)
    if run.data is not None:
        idx = batch_indices(step, cfg.batch_size, len(run.data[0]), cfg.seed)[rank * per:(rank + 1) * per]
        batch.x0 = run.data[0][idx].to(acc.device)
        batch.cond = run.data[1][idx].to(acc.device) if cfg.student.class_conditional else None
    if run.cache is not None:
        idx = batch_indices(step, cfg.batch_size, run.cache.num_samples, cfg.seed + 1)[rank * per:(rank + 1) * per]
        batch.traj = run.cache.rows(idx)
        if batch.cond is None and cfg.student.class_conditional:
            batch.cond = batch.traj["label"].to(acc.device)
    return run.objective.prepare(batch, run.nets)


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
        raise NonFiniteError(f"non-finite {what} ({float(value.detach()):g}) at step {step} in network {name!r}; the run "
                             f"stopped, its last good checkpoint is {last}")


def update_network(run: Run, name: str, batch: Batch) -> dict:
    acc, cfg = run.accelerator, run.cfg
    with only_training(run, name):
        loss = run.objective.loss(name, run.nets, batch).mean()
        if cfg.debug_nan_step == batch.step:
            loss = loss * float("nan")
        check_finite(run, loss, "loss", name, batch.step)
        acc.backward(loss)
    norm = acc.clip_grad_norm_(run.trainable[name], cfg.grad_clip if cfg.grad_clip is not None else float("inf"))
    if norm is not None and cfg.mixed_precision != "fp16":
        check_finite(run, norm, "gradient norm", name, batch.step)
    run.opts[name].step()
    run.scheds[name].step()
    run.opts[name].zero_grad(set_to_none=True)
    run.objective.after_update(name, run.nets, batch.step)
    if name == "student" and run.ema is not None:
        ema_update(run.ema, unwrap(run.nets["student"]), cfg.ema_decay)
    return {"loss": loss.item(), "grad_norm": float(norm) if norm is not None else float("nan"),
            "lr": run.scheds[name].get_last_lr()[0]}


# -- checkpoints and the end ---------------------------------------------------------------------------
def write_students(run: Run, folder: Path, merge_lora: bool) -> None:
    cfg_dict = dataclasses.asdict(run.cfg)
    save_student(unwrap(run.nets["student"]), folder / STUDENT_FILE, merge_lora=merge_lora, training_config=cfg_dict)
    if run.ema is not None:
        save_student(run.ema, folder / EMA_FILE, merge_lora=merge_lora, training_config=cfg_dict)


def checkpoint(run: Run, step: int) -> None:
    acc = run.accelerator

    def write(folder: Path) -> None:
        acc.save_state(str(folder))  # every rank: per-rank RNG files
        if acc.is_main_process:
            write_students(run, folder, merge_lora=False)

    run.last_checkpoint = save_checkpoint(run.out / "checkpoints", step, write, {"kind": "distill", "objective": run.objective.name},
                                          keep=run.cfg.keep_checkpoints, is_main=acc.is_main_process, barrier=acc.wait_for_everyone)


def finish(run: Run, log) -> Path:
    if run.accelerator.is_main_process:
        write_students(run, run.out, merge_lora=True)
        log(f"saved {run.out / STUDENT_FILE}")
    if run.writer is not None:
        run.writer.close()
    run.accelerator.wait_for_everyone()
    return run.out


# -- the loop --------------------------------------------------------------------------------------------
def train(cfg: RunConfig, *, load_teacher, build_student, resume: str | None = None, log=print,
          stop_at: int | None = None) -> Path | None:
    """Run (or resume) a distillation and return the run folder; ``stop_at`` ends early after checkpointing
    that step (returns None), as a time budget would. ``load_teacher(spec)`` and ``build_student(student_cfg,
    teacher, lora)`` come from the caller (scripts/distill.py), so that distill/ imports neither package."""
    check_tensorboard(cfg)
    ckpt = resolve_resume(Path(cfg.output_dir), resume)
    accelerator = make_accelerator(cfg)
    run = setup(cfg, accelerator, load_teacher, build_student)
    step = restore(run, ckpt, log)
    open_run_files(run, step)
    log(f"rank {accelerator.process_index} of {accelerator.num_processes}: {cfg.objective['name']} from step {step} "
        f"to {cfg.max_steps}")
    for net in run.nets.values():
        net.train()
    while step < cfg.max_steps:
        t0 = time.time()
        batch = make_batch(run, step)
        stats = {name: update_network(run, name, batch) for name in run.objective.updates(step)}
        step += 1
        log_metrics(run, step, stats, time.time() - t0, log)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            checkpoint(run, step)
        if stop_at is not None and step >= stop_at and step < cfg.max_steps:
            if step % cfg.checkpoint_every:
                checkpoint(run, step)
            return None
    return finish(run, log)
