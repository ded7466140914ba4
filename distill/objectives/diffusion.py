"""Diffusion training (denoising score matching): the teacher trainer, and the loss fake-score networks reuse.

    t ~ U{0, ..., T-1} (discrete schedules) or U[t_min, t_max],  eps ~ N(0, I),  x_t = alpha(t) x0 + sigma(t) eps
    L = || net(x_t, t, c) - target ||^2,  target = eps / x0 / v / u for the network's parameterization

(DDPM, Ho et al. 2020, Eq. 14, in each parameterization; v: Salimans & Ho 2022, Sec. 4). Class labels are
replaced by the null class with probability ``label_dropout`` (Ho & Salimans 2022), so one network also
serves unconditional sampling and classifier-free guidance. A run config with ``teacher: untrained`` trains a
teacher from scratch with it (``teachers.training``; ``beta_schedule`` / ``num_train_timesteps`` give that teacher's
schedule); ``space: x0`` trains on data-prediction error instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.core.conditioning import PromptCond
from distill.core.denoisers import UNCOND
from distill.core.schedules import BETA_SCHEDULES
from distill.engine.config import at_least, choice
from distill.objectives.base import Batch, Network, Objective, register_objective
from distill.objectives.losses import LOSS_SPACES, denoising_loss


@dataclass
class DiffusionOptions:
    label_dropout: float = at_least(0.1, 0.0, 1.0)  # probability of training a sample as unconditional
    space: str = choice("raw", LOSS_SPACES)  # error of the raw output (its own target) or of the data prediction
    # the discrete VP schedule of a teacher trained from scratch (teacher: untrained); null: squaredcos_cap_v2, 1000
    beta_schedule: str | None = choice(None, (None, *BETA_SCHEDULES))
    num_train_timesteps: int | None = at_least(None, 1)


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

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        if not getattr(ctx.teacher, "untrained", False) and (options.beta_schedule or options.num_train_timesteps):
            raise ValueError(f"objective.beta_schedule and objective.num_train_timesteps set the schedule of a teacher "
                             f"trained from scratch (teacher: untrained); teacher {ctx.teacher.name!r} has its own: drop them")

    def networks(self) -> list[Network]:
        return [Network("student", self.ctx.student)]

    def loss(self, name, nets, batch: Batch):
        cond = drop_labels(batch.cond, self.o.label_dropout, batch.g)
        t = sample_times(self.ctx.student.schedule, batch.size, batch.g).to(batch.device)
        eps = batch.randn(batch.x0.shape, batch.x0.dtype)
        return denoising_loss(nets["student"], batch.x0, t, eps, cond, space=self.o.space)
