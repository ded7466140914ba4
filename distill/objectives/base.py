"""The objective interface (DESIGN.md, contract 6): what a distillation method tells the trainer.

An objective is a small class built as ``cls(options, ctx)``: ``options`` is its validated ``Options``
dataclass (config ``objective:``), ``ctx`` a ``Context`` with what the engine gives it:

  * ``ctx.teacher``, ``ctx.student`` (a ``students.Student``, a ``NetDenoiser``), ``ctx.cache`` (a trajectory
    cache or None), ``ctx.device``, ``ctx.num_processes``, ``ctx.process_index``;
  * network factories: ``ctx.teacher_copy()`` (a trainable ``NetDenoiser`` copy of the teacher's network: the
    fake score of VSD / DMD / f-distill), ``ctx.student_copy(trainable)`` (an EMA target, PSO's reference),
    ``ctx.discriminator_head(net)`` (a small head on a network's bottleneck features), ``lora_disabled(net)``
    (a context in which a LoRA student computes its frozen base network);
  * ``ctx.reduce(tensor, "mean" | "sum")`` across processes (running statistics that must agree on all ranks).

It declares

  (a) the networks it trains, ``networks() -> [Network(name, module, every, offset, lr, ...)]``: the
      student first, then whatever else the method optimizes. Each gets its own optimizer, LR schedule,
      clipping and parameter groups (config ``networks.<name>`` overrides the declaration, ``optim`` fills
      the rest; ``betas`` and ``weight_decay`` are the exception: the declaration is the method's reference, used
      only when neither ``networks.<name>`` nor ``optim`` sets them, else Adam's (0.9, 0.999) and 0); none is special to the trainer;
  (b) which network updates at which step, ``updates(step) -> [names]`` (by default every network whose
      ``step % every == offset``, in declaration order);
  (c) the data it needs, ``needs``: a subset of ``DATA_KINDS``. ``"teacher"``: online teacher calls;
      ``"data"``: real samples ``batch.x0`` and labels; ``"trajectories"``: rows of a trajectory cache
      ``batch.traj``; ``"pairs"``: target / reference samples the objective makes itself in ``prepare``.
      ``batch.cond`` is whatever conditions the teacher (``distill.core.conditioning``): class labels, or for a
      text-to-image teacher a ``PromptCond`` the trainer encoded once per batch from the dataset's captions, a
      prompt dataset (``dataset: prompts:<file>``, also for objectives without ``"data"``) or a cache's prompt
      indices; with ``"data"`` and a latent teacher, ``batch.x0`` holds VAE latents. Objectives index, move and
      concatenate ``cond`` (``cat_cond``, ``unconditional``) without asking which kind it is
      (``takes_prompts(teacher)`` tells a guidance option that the null branch is a prompt);
  (d) a loss per network, ``loss(name, nets, batch)``: per-sample values [B], or a dict with ``"loss"`` [B]
      and named components (tensors or floats) that the trainer logs beside the total.

Other members: ``helpers()`` (untrained state that must survive a resume: EMA targets, running statistics;
checkpointed by the trainer), ``frozen()`` (modules the trainer moves to the device and casts, never
checkpointed: they are rebuilt), ``on_start(ctx, step)`` (after restore, without gradients: build a reference
set once, warm statistics), ``prepare(batch, nets)`` (without gradients, networks in eval mode),
``after_update(name, nets, step)`` (e.g. an EMA target update), and the class flags
``find_unused_parameters`` (a loss leaves some trained parameters unused on some steps: DDP must know) and
``supports_accumulation`` (losses that need the whole batch at once set it False).

The trainer reduces (mean), scales (mixed precision), clips, steps. All randomness comes from ``batch.g``, a
generator that is a pure function of (seed, step, rank, micro-batch), which is what makes resume bit-identical.
``nets`` maps names to modules: the network being updated as prepared by accelerate (DDP-wrapped where
distributed: call it so gradients synchronise), the others unwrapped and frozen while it updates; use
``unwrap(nets[name])`` for parameter arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

DATA_KINDS = ("teacher", "data", "trajectories", "pairs")
LORA_ADAPTER = "lora_adapter"  # a LoRA run's adapter folder (PEFT layout) in the run folder


@dataclass
class Network:
    """A trained network and its optimizer settings. ``None`` fields take the config's values (``networks.<name>``
    first, then ``optim``); ``betas`` is the method's reference, which a config value overrides (module doc, (a));
    ``param_groups`` are ``{"match": substring, "lr": ..., "weight_decay": ...}``."""

    name: str
    module: nn.Module
    every: int = 1  # update on steps with step % every == offset
    offset: int = 0
    lr: float | None = None
    betas: tuple[float, float] | None = None  # the method's reference betas: used when the config sets none
    weight_decay: float | None = None  # the method's reference weight decay: used when the config sets none
    grad_clip: float | None = None
    param_groups: list[dict] = field(default_factory=list)


@dataclass
class Batch:
    """What one step of one rank sees. ``g`` is the step's generator (seed, step, rank)."""

    step: int
    g: torch.Generator
    device: torch.device
    size: int  # per-rank batch size
    x0: torch.Tensor | None = None  # real data ("data")
    cond: Any = None  # class labels [B], a distill.core.conditioning.PromptCond (prompts), or None (unconditional)
    traj: dict[str, torch.Tensor] | None = None  # trajectory-cache rows ("trajectories")
    extra: dict[str, Any] = field(default_factory=dict)  # filled by Objective.prepare ("pairs", ...)

    def randn(self, shape, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(shape, generator=self.g, dtype=dtype).to(self.device)

    def rand(self, shape, dtype=torch.float32) -> torch.Tensor:
        return torch.rand(shape, generator=self.g, dtype=dtype).to(self.device)


@dataclass
class Context:
    """What the engine gives an objective (see the module doc)."""

    teacher: Any
    student: nn.Module
    cache: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    num_processes: int = 1
    process_index: int = 0
    reducer: Callable[[torch.Tensor, str], torch.Tensor] | None = None

    def reduce(self, value: torch.Tensor, op: str = "mean") -> torch.Tensor:
        """``value`` reduced over every process (identity on one process)."""
        if op not in ("mean", "sum"):
            raise ValueError(f"unknown reduction {op!r}; allowed: mean, sum")
        return value if self.reducer is None or self.num_processes == 1 else self.reducer(value, op)

    def teacher_copy(self, trainable: bool = True) -> nn.Module:
        from distill.engine.roles import teacher_copy

        return teacher_copy(self.teacher, trainable)

    def student_copy(self, trainable: bool = False) -> nn.Module:
        from distill.engine.roles import module_copy

        return module_copy(self.student, trainable)

    def discriminator_head(self, net: nn.Module, **kwargs) -> nn.Module:
        from distill.engine.roles import discriminator_head

        return discriminator_head(net, self.teacher.data_shape, **kwargs)


def unwrap(module: nn.Module) -> nn.Module:
    """The bare module inside DDP / accelerate / ``torch.compile`` (``OptimizedModule``) wrappers."""
    while True:
        if isinstance(getattr(module, "_orig_mod", None), nn.Module):  # torch.compile(module), e.g. accelerate's dynamo_backend
            module = module._orig_mod
        elif hasattr(module, "module") and isinstance(module.module, nn.Module):
            module = module.module
        else:
            return module


class Objective:
    """Base class; see the module docstring. Subclasses set ``name``, ``needs`` and ``Options``."""

    name: ClassVar[str] = "base"
    needs: ClassVar[frozenset[str]] = frozenset()
    Options: ClassVar[type] = object  # a dataclass of method options, validated from config ``objective``
    find_unused_parameters: ClassVar[bool] = False  # some trained parameters unused on some steps (DDP)
    supports_accumulation: ClassVar[bool] = True  # losses may be computed on micro-batches
    cache_keys: ClassVar[tuple[str, ...] | None] = None  # trajectory-cache keys ``batch.traj`` holds; None: all

    def __init__(self, options, ctx: Context):
        self.o, self.ctx = options, ctx

    def networks(self) -> list[Network]:
        raise NotImplementedError

    def helpers(self) -> dict[str, nn.Module]:
        return {}

    def frozen(self) -> dict[str, nn.Module]:
        return {}

    def on_start(self, ctx: Context, step: int) -> None:
        pass

    def updates(self, step: int) -> list[str]:
        specs = getattr(self, "_specs", None) or self.networks()  # the trainer stores them with config overrides applied
        return [n.name for n in specs if step % n.every == n.offset]

    def prepare(self, batch: Batch, nets: dict[str, nn.Module]) -> Batch:
        return batch

    def loss(self, name: str, nets: dict[str, nn.Module], batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def after_update(self, name: str, nets: dict[str, nn.Module], step: int) -> None:
        pass

    def save_result(self, folder: Path, student: nn.Module, ema: nn.Module | None, training_config: dict, final: bool) -> None:
        """Write the run's product into ``folder`` (a checkpoint, or the run folder when ``final``): by default the
        student file and its EMA, LoRA merged only at the end (``distill.engine.export``)."""
        from distill.engine.export import EMA_FILE, STUDENT_FILE, save_student
        from distill.engine.lora import has_lora, save_peft_adapter

        save_student(student, folder / STUDENT_FILE, merge_lora=final, training_config=training_config)
        if ema is not None:
            save_student(ema, folder / EMA_FILE, merge_lora=final, training_config=training_config)
        if final and has_lora(student.net):  # the adapter alone, in PEFT's layout, beside the merged files
            save_peft_adapter(student.net, student.info["lora"], folder / LORA_ADAPTER, base_model=student.info.get("teacher"))


OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    if cls.name in OBJECTIVES:
        raise ValueError(f"objective {cls.name!r} is already registered")
    unknown = set(cls.needs) - set(DATA_KINDS)
    if unknown:
        raise ValueError(f"objective {cls.name!r} needs unknown data kinds {sorted(unknown)}; allowed: {', '.join(DATA_KINDS)}")
    OBJECTIVES[cls.name] = cls
    return cls


def get_objective(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; allowed: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * source (buffers copied), in one multi-tensor lerp where the dtypes agree
    (the kernel of ``torch.optim.swa_utils.get_ema_multi_avg_fn``; bit-identical to a per-parameter ``lerp_``). Not
    ``AveragedModel`` or diffusers' ``EMAModel``: the first copies the weights on its first update and the second warms
    its decay up by default (min(decay, (1 + n) / (10 + n))), where this EMA starts from the initial student at a fixed
    decay, as every committed student was trained."""
    targets, sources = list(target.parameters()), [p.detach() for p in source.parameters()]
    if all(t.dtype == s.dtype and t.device == s.device for t, s in zip(targets, sources)):
        torch._foreach_lerp_(targets, sources, 1.0 - decay)
    else:
        for p_t, p_s in zip(targets, sources):
            p_t.lerp_(p_s.to(p_t.dtype), 1.0 - decay)
    for b_t, b_s in zip(target.buffers(), source.buffers()):
        b_t.copy_(b_s)


def check_student_form(objective: str, student, sampler: str, parameterization: str, trains: str) -> None:
    """Refuse, in one sentence, a student whose ``sampler`` or ``parameterization`` the objective cannot train
    (``trains``: what it trains, e.g. 'an average-velocity student')."""
    from distill.engine.config import ConfigError

    if student.sampler != sampler or student.parameterization != parameterization:
        raise ConfigError(f"objective {objective!r} trains {trains}: set student.sampler {sampler!r} and student.parameterization "
                          f"{parameterization!r} (got {student.sampler!r}, {student.parameterization!r})")

