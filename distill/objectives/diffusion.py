"""Diffusion training (denoising score matching): the teacher trainer, and the loss fake-score networks reuse.

    t ~ U{0, ..., T-1} (discrete schedules) or U[t_min, t_max],  eps ~ N(0, I),  x_t = alpha(t) x0 + sigma(t) eps
    L = || net(x_t, t, c) - target ||^2,  target = eps / x0 / v / u for the network's parameterization

(DDPM, Ho et al. 2020, Eq. 14, in each parameterization; v: Salimans & Ho 2022, Sec. 4). Class labels are
replaced by the null class with probability ``label_dropout`` (Ho & Salimans 2022), so one network also
serves unconditional sampling and classifier-free guidance. ``scripts/train_teacher.py`` runs this objective
through the main trainer (``teachers.training``); ``space: x0`` trains on data-prediction error instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.core.conditioning import PromptCond
from distill.core.denoisers import UNCOND
from distill.engine.config import at_least, choice
from distill.objectives.base import Batch, Network, Objective, register_objective
from distill.objectives.losses import LOSS_SPACES, denoising_loss


@dataclass
class DiffusionOptions:
    label_dropout: float = at_least(0.1, 0.0, 1.0)  # probability of training a sample as unconditional
    space: str = choice("raw", LOSS_SPACES)  # error of the raw output (its own target) or of the data prediction


def sample_times(schedule, n: int, g: torch.Generator) -> torch.Tensor:
    """Training times: integer timesteps for a discrete schedule (diffusers' training), else uniform in [t_min, t_max]."""
    steps = getattr(schedule, "num_train_timesteps", None)
    if steps is not None:
        return torch.randint(0, steps, (n,), generator=g).double()
    return schedule.t_min + (schedule.t_max - schedule.t_min) * torch.rand(n, generator=g, dtype=torch.float64)


def drop_labels(cond: torch.Tensor | None, p: float, g: torch.Generator) -> torch.Tensor | None:
    if cond is None:
        return None
    drop = torch.rand(len(cond), generator=g) < p
    if isinstance(cond, PromptCond):  # a dropped prompt becomes its null branch (the empty prompt)
        return cond.dropped(drop)
    return torch.where(drop.to(cond.device), torch.full_like(cond, UNCOND), cond)


@register_objective
class Diffusion(Objective):
    name = "diffusion"
    needs = frozenset({"data"})
    Options = DiffusionOptions

    def networks(self) -> list[Network]:
        return [Network("student", self.ctx.student)]

    def loss(self, name, nets, batch: Batch):
        cond = drop_labels(batch.cond, self.o.label_dropout, batch.g)
        t = sample_times(self.ctx.student.schedule, batch.size, batch.g).to(batch.device)
        eps = batch.randn(batch.x0.shape, batch.x0.dtype)
        return denoising_loss(nets["student"], batch.x0, t, eps, cond, space=self.o.space)
