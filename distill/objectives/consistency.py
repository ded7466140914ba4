"""Consistency distillation (Song et al. 2023, "Consistency Models", Algorithm 2).

On the N-point grid t_1 = t_min < ... < t_N = t_max (a ``distill.grids`` spacing, Karras rho = 7 by default):

    x ~ data,  n ~ U{1, ..., N-1},  z ~ N(0, I),   x_{t_{n+1}} = alpha(t_{n+1}) x + sigma(t_{n+1}) z
    x^_{t_n} = one step of a registered teacher solver from t_{n+1} to t_n            (no grad)
    L = d( f_theta(x_{t_{n+1}}, t_{n+1}),  f_theta-(x^_{t_n}, t_n) )                    (lambda(t_n) = 1)
    theta- <- mu theta- + (1 - mu) theta                                                 (after each step)

``f`` is the student with the consistency boundary condition (``students.Student``); theta- is an EMA
target network owned by this objective (checkpointed by the trainer as a helper). Distances: ``l2`` (mean
of squares over dimensions) and ``pseudo_huber`` sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(d)
(Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models", Sec. 3.3).

``source: trajectories`` reads x_{t_{n+1}} and x^_{t_n} as consecutive states of a trajectory cache
instead (its grid is then the discretization and no teacher is called during training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.config import ConfigError, at_least, choice
from distill.denoisers import classifier_free_guidance
from distill.grids import GRIDS, make_grid
from distill.losses import add_noise, distance, grouped_step
from distill.objectives.base import Batch, Network, Objective, ema_update, register_objective, unwrap
from distill.solvers import SOLVERS


@dataclass
class ConsistencyOptions:
    num_scales: int = at_least(18, 2)  # N: grid points from t_max to t_min (N - 1 teacher steps)
    grid: str = choice("karras", GRIDS)  # spacing of the N points
    solver: str = choice("heun", sorted(SOLVERS))  # any registered solver (euler, heun, dpmpp_2m, ...) for the step t_{n+1} -> t_n
    distance: str = choice("pseudo_huber", ("l2", "pseudo_huber"))
    huber_c: float | None = None  # pseudo-Huber c; null: 0.00054 sqrt(data dimension)
    target_ema: float = at_least(0.95, 0.0, 1.0)  # mu of the target network theta-
    source: str = choice("data", ("data", "trajectories"))  # where x_{t_{n+1}} and x^_{t_n} come from
    guidance_scale: float | None = None  # classifier-free guidance of the teacher (needs class labels)


@register_objective
class ConsistencyDistillation(Objective):
    name = "consistency"
    needs = frozenset({"teacher", "data"})
    Options = ConsistencyOptions
    cache_keys = ("states", "label")

    def __init__(self, options: ConsistencyOptions, ctx):
        super().__init__(options, ctx)
        teacher, cache = ctx.teacher, ctx.cache
        self.teacher, self.student, self.schedule = teacher, ctx.student, teacher.schedule
        self.target = ctx.student_copy(trainable=False)
        if options.source == "trajectories":
            if cache is None:
                raise ConfigError("objective.source is 'trajectories' but the config names no 'trajectories' cache folder")
            self.needs = frozenset({"trajectories"})
            self.ts = cache.ts
        else:
            self.ts = make_grid(self.schedule, options.num_scales - 1, options.grid, final="t_min")
        self.denoiser = teacher.denoise
        if options.guidance_scale is not None and not (teacher.num_classes and teacher.has_uncond):
            raise ConfigError(f"config key 'objective.guidance_scale' needs a class-conditional teacher with an unconditional "
                              f"mode; {teacher.name!r} has {teacher.num_classes} classes (set it to null)")
        if options.guidance_scale is not None:
            self.denoiser = classifier_free_guidance(teacher.denoise, options.guidance_scale)

    def networks(self) -> list[Network]:
        return [Network("student", self.student)]

    def helpers(self):
        return {"target": self.target}

    # -- the pair (x_{t_{n+1}}, x^_{t_n}) --------------------------------------------------------------
    def _pair_from_data(self, batch: Batch):
        x0 = batch.x0
        j = torch.randint(0, len(self.ts) - 1, (len(x0),), generator=batch.g).to(x0.device)
        z = batch.randn(x0.shape, x0.dtype)
        x_next = add_noise(self.schedule, x0, z, self.ts[j.cpu()])
        x_cur = grouped_step(SOLVERS[self.o.solver].fn, self.denoiser, x_next, self.ts[j.cpu()], self.ts[j.cpu() + 1],
                             self.schedule, batch.cond)
        return x_next, j, x_cur

    def _pair_from_cache(self, batch: Batch):
        states = batch.traj["states"]  # [B, K + 1, ...] at the cache grid ts
        last = int((self.ts > self.schedule.t_clean).sum()) - 1  # the final pair may not end on clean data
        j = torch.randint(0, last, (len(states),), generator=batch.g)
        rows = torch.arange(len(states))
        return states[rows, j].to(batch.device), j.to(batch.device), states[rows, j + 1].to(batch.device)

    # -- the loss -------------------------------------------------------------------------------------
    def loss(self, name, nets, batch):
        pair = self._pair_from_cache(batch) if self.o.source == "trajectories" else self._pair_from_data(batch)
        x_next, j, x_cur = pair
        ts = self.ts.to(batch.device)
        f = nets["student"](x_next, ts[j], batch.cond)
        with torch.no_grad():
            f_target = self.target(x_cur, ts[j + 1], batch.cond)
        return distance(f, f_target.to(f.dtype), self.o.distance, self.o.huber_c)

    def after_update(self, name, nets, step):
        ema_update(self.target, unwrap(nets["student"]), self.o.target_ema)
