"""The objective interface (DESIGN.md, contract 6): what a distillation method tells the trainer.

An objective is a small class. It declares

  (a) the networks it trains, ``networks() -> [Network(name, module, every, offset, lr, ...)]``: the
      student first, then whatever else the method optimizes (a fake-score network, a discriminator
      or density-ratio head). Each gets its own optimizer and LR scheduler; none is special to the trainer;
  (b) which network updates at which step, ``updates(step) -> [names]`` (by default every network whose
      ``step % every == offset``, in declaration order; override for anything else);
  (c) the data it needs, ``needs``: a subset of ``DATA_KINDS``. ``"teacher"``: online teacher calls (the
      objective holds the teacher it was built with); ``"data"``: real samples ``batch.x0`` and labels;
      ``"trajectories"``: rows of a trajectory cache ``batch.traj``; ``"pairs"``: target / reference
      samples from the current student, which the objective makes itself in ``prepare`` (no grad);
  (d) a loss per network, ``loss(name, nets, batch) -> [B]`` per-sample values.

The trainer reduces (mean), scales (mixed precision), clips, steps, and then calls
``after_update(name, nets, step)`` (e.g. an EMA target update). Untrained state that must survive a
resume (EMA targets, running statistics) is returned by ``helpers()``; the trainer moves it to the device,
checkpoints it and restores it, without knowing what it is. All randomness comes from ``batch.g``, a
generator that is a pure function of (seed, step, rank), which is what makes resume bit-identical.

How the planned methods fit without changing the trainer:
  * progressive distillation: one network (student), ``needs={"teacher", "data"}``, the loss builds the
    two-DDIM-step target with a registered solver; halving rounds are separate runs (student -> teacher).
  * SLAM: as consistency distillation plus the gamma interpolation inside the loss; EMA target in helpers.
  * VSD / f-divergence / DMD: networks student, fake_score (and discriminator), each with its own lr and
    ``every``; ``needs={"teacher"}`` (+ ``"data"`` for a GAN term); the generator loss reads the other
    networks frozen (the trainer turns ``requires_grad`` off for networks not being updated).
  * reflow: one network, ``needs={"trajectories"}`` (noise / sample pairs from the cache).
  * PSO: one network, ``needs={"data", "pairs"}``; ``prepare`` draws reference samples from the student.

``nets`` maps names to the modules as prepared by accelerate (DDP-wrapped where distributed): call
those in losses so gradients synchronise; use ``unwrap(nets[name])`` for parameter arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

DATA_KINDS = ("teacher", "data", "trajectories", "pairs")


@dataclass
class Network:
    """A trained network and its optimizer group. ``None`` fields take the run config's ``optim`` values."""

    name: str
    module: nn.Module
    every: int = 1  # update on steps with step % every == offset
    offset: int = 0
    lr: float | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None


@dataclass
class Batch:
    """What one step of one rank sees. ``g`` is the step's generator (seed, step, rank)."""

    step: int
    g: torch.Generator
    device: torch.device
    size: int  # per-rank batch size
    x0: torch.Tensor | None = None  # real data ("data")
    cond: torch.Tensor | None = None  # class labels, or None for unconditional training
    traj: dict[str, torch.Tensor] | None = None  # trajectory-cache rows ("trajectories")
    extra: dict[str, Any] = field(default_factory=dict)  # filled by Objective.prepare ("pairs", ...)

    def randn(self, shape, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(shape, generator=self.g, dtype=dtype).to(self.device)


def unwrap(module: nn.Module) -> nn.Module:
    """The bare module inside a DDP / accelerate wrapper."""
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return module


class Objective:
    """Base class; see the module docstring. Subclasses set ``name``, ``needs`` and ``Options``."""

    name: ClassVar[str] = "base"
    needs: ClassVar[frozenset[str]] = frozenset()
    Options: ClassVar[type] = object  # a dataclass of method options, validated from config ``objective``

    def networks(self) -> list[Network]:
        raise NotImplementedError

    def helpers(self) -> dict[str, nn.Module]:
        return {}

    def updates(self, step: int) -> list[str]:
        return [n.name for n in self.networks() if step % n.every == n.offset]

    def prepare(self, batch: Batch, nets: dict[str, nn.Module]) -> Batch:
        return batch

    def loss(self, name: str, nets: dict[str, nn.Module], batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def after_update(self, name: str, nets: dict[str, nn.Module], step: int) -> None:
        pass


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
    """target <- decay * target + (1 - decay) * source, parameter by parameter (buffers copied)."""
    for p_t, p_s in zip(target.parameters(), source.parameters()):
        p_t.lerp_(p_s.detach().to(p_t.dtype), 1.0 - decay)
    for b_t, b_s in zip(target.buffers(), source.buffers()):
        b_t.copy_(b_s)
