"""Teacher training: a diffusers UNet2DModel (images) or ToyMLP (2-D toys) on the discrete VP process.

Epsilon or v prediction; class-conditional with label dropout so one model also serves unconditional
sampling and classifier-free guidance; EMA; atomic checkpoints and exact resume; the result is saved
as a diffusers pipeline folder that both ``teachers.load_teacher`` and diffusers accept.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from distill.checkpoint import batch_indices, latest_checkpoint, read_manifest, save_checkpoint, step_generator
from distill.config import merge
from distill.data import dataset_tensors, load_dataset
from distill.param import PREDICTION_TYPES, from_x0
from distill.schedules import BETA_SCHEDULES, DiscreteVP
from distill.train import check_world_size, lr_lambda

ARCHS = ("unet", "mlp")


@dataclass
class TeacherConfig:
    dataset: str = "mnist16"  # a name for distill.data.load_dataset
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
    mixed_precision: str = "no"  # no | fp16 | bf16 (accelerate)
    output_dir: str = "runs/teacher"

    def validate(self) -> None:
        choices = {"arch": ARCHS, "prediction_type": PREDICTION_TYPES[:3], "beta_schedule": BETA_SCHEDULES,
                   "mixed_precision": ("no", "fp16", "bf16")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"config key {key!r} is {getattr(self, key)!r}; allowed: {', '.join(allowed)}")
        for key in ("batch_size", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "num_train_timesteps"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key {key!r} must be at least 1, got {getattr(self, key)}")
        if not 0 <= self.label_dropout < 1 or not 0 <= self.ema_decay < 1 or self.lr <= 0:
            raise ValueError("label_dropout and ema_decay must lie in [0, 1) and lr must be positive")


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TeacherConfig:
    """A validated config from YAML plus overrides; unknown keys are errors naming the allowed ones."""
    raw = yaml.safe_load(Path(path).read_text()) if path else {}
    raw = merge(raw or {}, overrides or {})  # nested keys (model.*) are merged, not replaced
    allowed = {f.name for f in dataclasses.fields(TeacherConfig)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; allowed: {', '.join(sorted(allowed))}")
    cfg = TeacherConfig(**raw)
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


def diffusion_loss(model, x0, labels, schedule: DiscreteVP, prediction_type: str, g: torch.Generator):
    """Per-sample MSE between the network output and the target of its parameterization (DDPM, Ho et al. 2020, Eq. 14)."""
    t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=g).to(x0.device)
    eps = torch.randn(x0.shape, generator=g).to(x0.device)
    log_a, log_s = schedule.log_alpha_sigma(t.double().cpu())
    a, s = log_a.exp().to(x0), log_s.exp().to(x0)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    x_t = a.view(shape) * x0 + s.view(shape) * eps
    target = from_x0(x0, prediction_type, x_t, a, s)
    pred = model(x_t, t, class_labels=labels).sample
    return ((pred - target) ** 2).flatten(1).mean(1)


def save_teacher_folder(model, cfg: TeacherConfig, num_classes: int, out: Path, info: dict) -> None:
    """Write a diffusers pipeline folder atomically: unet/, scheduler/, model_index.json, teacher.json."""
    from diffusers import DDPMScheduler

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "unet")
    DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                  prediction_type=cfg.prediction_type, clip_sample=False).save_pretrained(tmp / "scheduler")
    index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", type(model).__name__], "scheduler": ["diffusers", "DDPMScheduler"]}
    (tmp / "model_index.json").write_text(json.dumps(index, indent=1))
    meta = {"num_classes": num_classes, "null_class_label": num_classes if (cfg.class_conditional and num_classes) else None,
            "config": dataclasses.asdict(cfg), **info}
    (tmp / "teacher.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def train(cfg: TeacherConfig, resume: bool = True, log=print, stop_at: int | None = None) -> Path | None:
    """Train (or resume) and return the saved teacher folder ``<output_dir>/teacher``.

    ``stop_at`` ends the run early after checkpointing that step (returns None), as a time budget would.
    """
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    # step_scheduler_with_optimizer=False: the LR schedule counts global steps (accelerate would otherwise
    # step a prepared scheduler once per process per step, running it num_processes times too fast)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                              step_scheduler_with_optimizer=False)
    check_world_size(accelerator.num_processes)
    out = Path(cfg.output_dir)
    data = load_dataset(cfg.dataset, "train")
    x_all, y_all = dataset_tensors(data)
    num_classes = data.num_classes if cfg.class_conditional else 0
    schedule = DiscreteVP(cfg.beta_schedule, cfg.num_train_timesteps)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tuple(x_all.shape[1:]), num_classes)
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.max_steps, "cosine"))
    model, opt, sched = accelerator.prepare(model, opt, sched)
    accelerator.register_for_checkpointing(ema)

    step = 0
    ckpt = latest_checkpoint(out / "checkpoints") if resume else None
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        step = read_manifest(ckpt)["step"]
        log(f"resumed from {ckpt} at step {step}")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    per_rank = cfg.batch_size // accelerator.num_processes
    t0, losses = time.time(), []
    bar = tqdm(total=cfg.max_steps, initial=step, desc="teacher", disable=not accelerator.is_main_process, mininterval=5)
    model.train()
    while step < cfg.max_steps:
        idx = batch_indices(step, cfg.batch_size, len(x_all), cfg.seed)
        idx = idx[accelerator.process_index * per_rank:(accelerator.process_index + 1) * per_rank]
        g = step_generator(cfg.seed, step, accelerator.process_index)
        x0, labels = x_all[idx].to(accelerator.device), None
        if num_classes:
            drop = torch.rand(len(idx), generator=g) < cfg.label_dropout
            labels = torch.where(drop, torch.full_like(y_all[idx], num_classes), y_all[idx]).to(accelerator.device)
        loss = diffusion_loss(model, x0, labels, schedule, cfg.prediction_type, g).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step} (network: teacher)")
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema.step(accelerator.unwrap_model(model).parameters())
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        losses.append(loss.item())
        if step % cfg.log_every == 0 and accelerator.is_main_process:
            log(f"step {step}/{cfg.max_steps} loss {sum(losses) / len(losses):.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"{(time.time() - t0) / len(losses):.2f} s/step")
            losses, t0 = [], time.time()
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            save_checkpoint(out / "checkpoints", step, lambda d: accelerator.save_state(str(d)), {"kind": "teacher"},
                            keep=cfg.keep_checkpoints, is_main=accelerator.is_main_process, barrier=accelerator.wait_for_everyone)
            accelerator.wait_for_everyone()
        if stop_at is not None and step >= stop_at:
            if step % cfg.checkpoint_every:
                save_checkpoint(out / "checkpoints", step, lambda d: accelerator.save_state(str(d)), {"kind": "teacher"},
                                keep=cfg.keep_checkpoints, is_main=accelerator.is_main_process,
                                barrier=accelerator.wait_for_everyone)
            bar.close()
            return None

    bar.close()
    final = out / "teacher"
    if accelerator.is_main_process:
        net = accelerator.unwrap_model(model)
        ema.store(net.parameters())
        ema.copy_to(net.parameters())
        save_teacher_folder(net, cfg, num_classes, final, {"steps": step, "dataset": cfg.dataset})
        ema.restore(net.parameters())
        log(f"saved teacher to {final}")
    accelerator.wait_for_everyone()
    return final
