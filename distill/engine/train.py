"""The distillation trainer (DESIGN.md, contract 7): one accelerate loop for every objective.

    python scripts/distill.py --config configs/distill/cd_ring8.yaml [--set key=value ...] [--resume latest]
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/distill.py --config ...

It is the only place that knows about devices, processes, mixed precision, gradient accumulation, checkpoints
and logging. Per step it asks the objective which networks update; for each one it computes the per-sample loss
on each micro-batch, reduces it (mean), backpropagates (scaled under fp16), checks loss and gradient norm are
finite, clips, sets the learning rate of the global step, steps the optimizer, then calls
``objective.after_update``. Networks not being updated have ``requires_grad`` off and are passed unwrapped
(no DDP) while another network's loss is computed.

Learning rates are a pure function of the global step (``lr_lambda``), whichever steps a network updates on.
Everything built before the first step (the accelerator, each network's resolved settings and optimizer, the
teacher, student and data) is ``distill.engine.run_setup``; resume, config.yaml, metrics.jsonl and the trackers are
``distill.engine.run_files``.

Exact resume: the data order is ``batch_indices(step, ...)`` and all noise comes from
``step_generator(seed, step, rank)``, both pure functions of the step; models, optimizers, the loss scaler,
the student EMA, the objective's helpers (e.g. an EMA target) and every rank's global RNG are written as tensors and
JSON (``distill.engine.run_state``: resuming unpickles nothing) inside an atomic checkpoint folder
(``distill.engine.checkpoint``). A run killed at any moment and resumed with ``resume="latest"`` ends bit-identical on
CPU to one that never stopped. The run folder is locked while the run writes it (``distill.engine.lock``).

DeepSpeed (configs/accelerate/deepspeed_zero2.yaml, set up in ``run_setup``) clips gradients itself
(``gradient_clipping`` in its config) and steps inside ``backward``; the gradient-norm check is skipped there,
and under fp16 (the loss scaler skips overflowing steps by design).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from tqdm import tqdm

from distill.core.atomic import write_with
from distill.core.progress import above_bars
from distill.engine.checkpoint import batch_indices, save_checkpoint, step_generator
from distill.engine.export import STUDENT_FILE
from distill.engine.lock import FolderLock, launched_rank
from distill.engine.paths import check_output_dir, file_sha256
from distill.engine.run_config import RunConfig, objective_options
from distill.engine.run_files import (
    CONFIG_FILE,
    METRICS_FILE,
    RESUME_FREE_KEYS,
    check_resume_config,
    config_changes,
    log_metrics,
    open_run_files,
    resolve_resume,
    restore,
    updates_and_seconds,
)
from distill.engine.run_setup import (
    HALF_SAFE_NETWORKS,
    NETWORKS_FILE,
    NetSettings,
    Run,
    build_objective,
    cast_teacher,
    check_tensorboard,
    check_trackers,
    check_world_size,
    configure_deepspeed,
    load_init_also,
    make_accelerator,
    make_context,
    make_optimizer,
    resolve_parent,
    resolve_settings,
    setup,
    trackers,
    weight_dtype,
)
from distill.engine.run_state import STATE_FORMAT, write_state
from distill.objectives.base import Batch, ema_update, unwrap

# the trainer's names, those of run_setup and run_files included, as importable from here as before the split
__all__ = [
    "CONFIG_FILE", "HALF_SAFE_NETWORKS", "METRICS_FILE", "NETWORKS_FILE", "RESUME_FREE_KEYS", "NetSettings", "NonFiniteError",
    "Run", "backward_micro_batches", "build_objective", "cast_teacher", "check_finite", "check_resume_config",
    "check_tensorboard", "check_trackers", "check_world_size", "checkpoint", "config_changes", "configure_deepspeed", "data_batch",
    "file_sha256", "finish", "load_init_also", "log_metrics", "lr_lambda", "make_accelerator", "make_batch",
    "make_context", "make_optimizer", "only_training", "open_run_files", "resolve_parent", "resolve_resume",
    "resolve_settings", "restore", "set_learning_rate", "setup", "split_loss", "start", "train", "trackers",
    "update_network", "updates_and_seconds", "weight_dtype", "write_students",
]


class NonFiniteError(FloatingPointError):
    """A loss or gradient norm was NaN or infinite; the message names the step and the network."""


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


def set_learning_rate(opt: torch.optim.Optimizer, settings: NetSettings, step: int, max_steps: int) -> float:
    """Every group's lr at global ``step`` (a pure function of the step); returns the default group's."""
    factor = lr_lambda(settings.warmup_steps, max_steps, settings.lr_schedule)(step)
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] * factor
    return opt.param_groups[0]["lr"]


# -- one step ------------------------------------------------------------------------------------------
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
        write_with(folder / NETWORKS_FILE, lambda tmp: save_file(state, str(tmp)))


def checkpoint(run: Run, step: int) -> None:
    acc = run.accelerator

    def write(folder: Path) -> None:
        write_state(run, folder)  # every rank: per-rank random states; tensors and JSON only (run_state)
        if acc.is_main_process:
            write_students(run, folder, final=False)
            (folder / CONFIG_FILE).write_text(yaml.safe_dump(dataclasses.asdict(run.cfg), sort_keys=False))

    run.last_checkpoint = save_checkpoint(run.out / "checkpoints", step, write, {"kind": "distill", "objective": run.objective.name,
                                                                           "state_format": STATE_FORMAT},
                                          keep=run.cfg.keep_checkpoints, is_main=acc.is_main_process, barrier=acc.wait_for_everyone)


def finish(run: Run, log) -> Path:
    """Write the final student, wait for every rank, then close the trackers. ``end_training`` also destroys the
    process group (accelerate 1.16), so it comes last: no barrier or collective may follow it."""
    if run.accelerator.is_main_process:
        write_students(run, run.out, final=True)
        log(f"saved {run.out / STUDENT_FILE}")
    run.accelerator.wait_for_everyone()
    if run.trackers:
        run.accelerator.end_training()
    return run.out


# -- the loop --------------------------------------------------------------------------------------------
def start(cfg: RunConfig, load_teacher, build_student, resume: str | None, log) -> tuple[Run, int]:
    """Everything before the first step: checks, accelerator, networks, restore, run files, ``on_start``."""
    check_trackers(cfg)
    check_output_dir(cfg.output_dir, "output_dir")
    lock = FolderLock(cfg.output_dir, enabled=launched_rank() == 0)  # one writer per run folder (distill.engine.lock)
    lock.acquire_existing()  # a folder written before: locked before its checkpoints are read
    try:
        ckpt = resolve_resume(Path(cfg.output_dir), resume, log)
        cls, _ = objective_options(cfg.objective)
        accelerator = make_accelerator(cfg, cls.find_unused_parameters or cfg.adversarial is not None)
        check_resume_config(cfg, ckpt)
        run = setup(cfg, accelerator, load_teacher, build_student, resuming=ckpt is not None)
        step = restore(run, ckpt, log)
        run.lock = lock.acquire()  # a new folder is made and locked just before the first write
        open_run_files(run, step, log)
        with torch.no_grad():
            run.objective.on_start(run.ctx, step)
    except BaseException:
        lock.release()
        raise
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
    with run.lock:  # released at the end, however the loop ends (the kernel releases it if the process dies)
        return run_steps(run, step, stop_at, log)


def run_steps(run: Run, step: int, stop_at: int | None, log) -> Path | None:
    """The loop from ``step`` (see ``train``)."""
    cfg, log = run.cfg, above_bars(log)  # log lines go above the progress bar, not over it
    log(f"rank {run.accelerator.process_index} of {run.accelerator.num_processes}: {cfg.objective['name']} from step "
        f"{step} to {cfg.max_steps}")
    bar = tqdm(total=cfg.max_steps, initial=step, desc=cfg.objective["name"], mininterval=5,
               disable=not run.accelerator.is_main_process)
    with bar:  # closed however the loop ends, so that an error message starts on a line of its own
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
                return None
    return finish(run, log)
