"""Consistency distillation (Song et al. 2023, "Consistency Models", Algorithm 2), with the options of LCM and of
improved consistency training.

On the N-point grid t_1 = t_min < ... < t_N = t_max (a ``distill.core.grids`` spacing, Karras rho = 7 by default):

    x ~ data,  n ~ p(n),  z ~ N(0, I),   x_{t_{n+k}} = alpha(t_{n+k}) x + sigma(t_{n+k}) z
    x^_{t_n} = one step of a registered teacher solver from t_{n+k} to t_n            (no grad)
    L = d( f_theta(x_{t_{n+k}}, t_{n+k}),  f_theta-(x^_{t_n}, t_n) )                    (lambda(t_n) = 1)
    theta- <- mu theta- + (1 - mu) theta                                                 (after each step)

``f`` is the student with the consistency boundary condition (``students.Student``); theta- is an EMA
target network owned by this objective (checkpointed by the trainer as a helper). Distances: ``l2`` (mean
of squares over dimensions) and ``pseudo_huber`` sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(d)
(Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models", Sec. 3.3).

Options beyond Algorithm 2:
  * ``skip_steps`` k: the teacher jumps k grid intervals at once (LCM's skipping-step, Luo et al. 2023, Sec. 4.3);
  * ``time_sampling: lognormal``: n drawn with probability proportional to the lognormal mass of log sigma~ on
    [t_n, t_{n+k}] (iCT, Song & Dhariwal 2023, Sec. 3.5, P_mean = -1.1, P_std = 2.0), sigma~ = sigma / alpha;
  * ``curriculum_steps`` K: the discretisation curriculum of iCT (Sec. 3.4), N(step) = min(s0 2^floor(step / K'),
    s1) + 1 points with K' = floor(K / (log2 floor(s1 / s0) + 1)), s0 + 1 = ``curriculum_start``, s1 + 1 = N;
  * ``guidance_range`` [w_min, w_max]: guidance-distilled students (Meng et al. 2023; LCM, Luo et al. 2023,
    Eq. 9): the teacher step uses classifier-free guidance with w ~ U[w_min, w_max] per sample, and student
    and target take w as an extra embedded input (``student.add_condition("w")``; a UNet2DConditionModel takes it
    through its ``time_cond_proj_dim`` input as LCM does, ``distill.core.denoisers.guidance_scale_embedding``); at sampling
    ``student.sample(..., w=2.0)`` picks the scale at no extra NFE (default: the middle of the range). With a
    text-to-image teacher ``cond`` is a ``PromptCond`` and the unconditional branch is the empty (or negative) prompt.

``source: trajectories`` reads x_{t_{n+k}} and x^_{t_n} as states of a trajectory cache k apart instead (its
grid is then the discretization and no teacher is called during training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from distill.core.conditioning import takes_prompts
from distill.core.denoisers import classifier_free_guidance, guided_prediction
from distill.core.grids import GRIDS, make_grid
from distill.engine.config import ConfigError, at_least, choice
from distill.objectives.base import Batch, Network, Objective, ema_update, register_objective, unwrap
from distill.objectives.losses import DISTANCES, add_noise, distance, grouped_step
from distill.solvers import SOLVERS

TIME_SAMPLINGS = ("uniform", "lognormal")


@dataclass
class ConsistencyOptions:
    num_scales: int = at_least(18, 2)  # N: grid points from t_max to t_min (N - 1 teacher steps)
    grid: str = choice("karras", GRIDS)  # spacing of the N points
    solver: str = choice("heun", sorted(SOLVERS))  # any registered solver (euler, heun, dpmpp_2m, ...) for the step t_{n+k} -> t_n
    distance: str = choice("pseudo_huber", DISTANCES)  # huber: per element (LCM), pseudo_huber: whole vector (iCT)
    huber_c: float | None = None  # pseudo-Huber c; null: 0.00054 sqrt(data dimension)
    target_ema: float = at_least(0.95, 0.0, 1.0)  # mu of the target network theta-
    source: str = choice("data", ("data", "trajectories"))  # where x_{t_{n+k}} and x^_{t_n} come from
    guidance_scale: float | None = None  # classifier-free guidance of the teacher at one fixed w (needs class labels)
    skip_steps: int = at_least(1, 1)  # k: grid intervals per teacher step (LCM's skipping-step)
    time_sampling: str = choice("uniform", TIME_SAMPLINGS)  # how n is drawn: uniform, or iCT's lognormal
    lognormal_mean: float = -1.1  # P_mean of log sigma~ for time_sampling: lognormal
    lognormal_std: float = at_least(2.0, 1e-6)  # P_std of log sigma~
    curriculum_steps: int | None = at_least(None, 1)  # iCT discretisation curriculum over this many steps; null: N fixed
    curriculum_start: int = at_least(11, 3)  # grid points at step 0 under the curriculum (iCT's s0 + 1)
    guidance_range: list[float] | None = field(default=None)  # [w_min, w_max]: w-conditioned student, w ~ U per sample
    condition_lr: float | None = at_least(None, 0.0)  # lr of the extra embeddings (w, SLAM's gamma); null: the student's


@dataclass
class Pair:
    """One training pair per sample: the student's point and the teacher's step k grid intervals below it."""

    x_next: torch.Tensor  # x_{t_{n+k}}
    t_next: torch.Tensor  # [B] float64
    x_cur: torch.Tensor  # x^_{t_n}
    t_cur: torch.Tensor  # [B] float64
    extra: dict  # per-sample extra inputs of student and target (w)


def curriculum_scales(step: int, total: int, start: int, final: int) -> int:
    """N(step) of iCT's discretisation curriculum (Song & Dhariwal 2023, Sec. 3.4): min(s0 2^floor(step / K'), s1) + 1 with
    K' = floor(K / (log2 floor(s1 / s0) + 1)), the log2 real-valued (it was floored before 0.3)."""
    s0, s1 = start - 1, final - 1
    k_prime = max(math.floor(total / (math.log2(s1 // s0) + 1)), 1)
    return min(s0 * 2 ** (step // k_prime), s1) + 1


def lognormal_weights(schedule, ts: torch.Tensor, k: int, mean: float, std: float) -> torch.Tensor:
    """p(n) proportional to erf((log sigma~_{n+k} - P_mean) / (sqrt2 P_std)) - erf((log sigma~_n - P_mean) / (sqrt2 P_std))
    (Song & Dhariwal 2023, Sec. 3.5), over the pairs (ts[j], ts[j + k]) of a decreasing grid; log sigma~ = -lam(t)."""
    cdf = torch.erf((-schedule.lam(ts) - mean) / (math.sqrt(2) * std))
    return (cdf[:-k] - cdf[k:]).clamp_min(0) + 1e-12


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
        self._check(options, teacher, cache)
        self.add_conditions()
        self.target = ctx.student_copy(trainable=False)
        if options.source == "trajectories":
            self.needs = frozenset({"trajectories"})
            self.ts = cache.ts
        else:
            self.ts = make_grid(self.schedule, options.num_scales - 1, options.grid, final="t_min")
        self._grids = {len(self.ts): self.ts}
        self.denoiser = teacher.denoise
        if options.guidance_scale is not None:
            self.denoiser = classifier_free_guidance(teacher.denoise, options.guidance_scale)
        if options.guidance_range is not None:
            self.denoiser = lambda x, t, cond, w: guided_prediction(teacher.denoise, x, t, cond, w)  # noqa: E731

    # -- options and extra inputs ------------------------------------------------------------------------
    @staticmethod
    def _check(o: ConsistencyOptions, teacher, cache) -> None:
        guided = o.guidance_scale is not None or o.guidance_range is not None
        prompts = takes_prompts(teacher)  # text-to-image: the null branch is a prompt
        if guided and not prompts and not (teacher.num_classes and teacher.has_uncond):
            key = "guidance_scale" if o.guidance_scale is not None else "guidance_range"
            raise ConfigError(f"config key 'objective.{key}' needs a class-conditional teacher with an unconditional "
                              f"mode; {teacher.name!r} has {teacher.num_classes} classes (set it to null)")
        if o.guidance_scale is not None and o.guidance_range is not None:
            raise ConfigError("config keys 'objective.guidance_scale' and 'objective.guidance_range' exclude each other; "
                              "set one to null")
        numbers = o.guidance_range is not None and all(isinstance(w, (int, float)) for w in o.guidance_range)
        if o.guidance_range is not None and not (numbers and len(o.guidance_range) == 2 and o.guidance_range[0] <= o.guidance_range[1]):
            raise ConfigError(f"config key 'objective.guidance_range' must be [w_min, w_max] with w_min <= w_max, "
                              f"got {o.guidance_range!r}")
        if o.source == "trajectories":
            if cache is None:
                raise ConfigError("objective.source is 'trajectories' but the config names no 'trajectories' cache folder")
            for key in ("curriculum_steps", "guidance_range"):
                if getattr(o, key) is not None:
                    raise ConfigError(f"config key 'objective.{key}' needs 'objective.source: data' (a cache has one grid "
                                      f"and one guidance scale); set it to null")
        smallest = o.curriculum_start if o.curriculum_steps is not None else o.num_scales
        if o.source == "data" and o.skip_steps > smallest - 1:
            raise ConfigError(f"config key 'objective.skip_steps' is {o.skip_steps}; allowed: 1 to {smallest - 1} "
                              f"(grid intervals, fewest {smallest - 1} with these options)")
        if o.curriculum_steps is not None and o.curriculum_start > o.num_scales:
            raise ConfigError(f"config key 'objective.curriculum_start' ({o.curriculum_start}) must be at most "
                              f"'objective.num_scales' ({o.num_scales})")

    def add_conditions(self) -> None:
        """The student's extra embedded inputs (zero-initialised: the network is unchanged at initialisation)."""
        if self.o.guidance_range is not None:
            self.student.add_condition("w", default=sum(self.o.guidance_range) / 2)

    def networks(self) -> list[Network]:
        groups = [] if self.o.condition_lr is None else [{"match": "conditions.", "lr": self.o.condition_lr}]
        return [Network("student", self.student, param_groups=groups)]

    def helpers(self):
        return {"target": self.target}

    # -- the pair (x_{t_{n+k}}, x^_{t_n}) --------------------------------------------------------------
    def grid_at(self, step: int) -> torch.Tensor:
        """The decreasing grid in force at ``step`` (the full grid unless the curriculum is on)."""
        if self.o.curriculum_steps is None or self.o.source == "trajectories":
            return self.ts
        n = curriculum_scales(step, self.o.curriculum_steps, self.o.curriculum_start, self.o.num_scales)
        if n not in self._grids:
            self._grids[n] = make_grid(self.schedule, n - 1, self.o.grid, final="t_min")
        return self._grids[n]

    def sample_index(self, batch: Batch, ts: torch.Tensor, last: int, size: int) -> torch.Tensor:
        """j in [0, last) per sample (the pair ts[j] -> ts[j + k]), uniform or iCT's lognormal."""
        if self.o.time_sampling == "uniform":
            return torch.randint(0, last, (size,), generator=batch.g)
        p = lognormal_weights(self.schedule, ts, self.o.skip_steps, self.o.lognormal_mean, self.o.lognormal_std)[:last]
        return torch.multinomial(p, size, replacement=True, generator=batch.g)

    def sample_w(self, batch: Batch, size: int) -> dict:
        """{"w": [B]} drawn uniformly from the guidance range, or {}; the uniforms are drawn in every run, so a
        w-conditioned run and a fixed-w one see the same later draws (SLAM's gamma)."""
        u = batch.rand((size,))
        if self.o.guidance_range is None:
            return {}
        w_min, w_max = map(float, self.o.guidance_range)
        return {"w": w_min + (w_max - w_min) * u}

    def _pair_from_data(self, batch: Batch) -> Pair:
        x0, k, ts = batch.x0, self.o.skip_steps, self.grid_at(batch.step)
        j = self.sample_index(batch, ts, len(ts) - k, len(x0))
        z = batch.randn(x0.shape, x0.dtype)
        extra = self.sample_w(batch, len(x0))
        t_next, t_cur = ts[j], ts[j + k]
        x_next = add_noise(self.schedule, x0, z, t_next)
        x_cur = grouped_step(SOLVERS[self.o.solver].fn, self.denoiser, x_next, t_next, t_cur, self.schedule, batch.cond, extra)
        return Pair(x_next, t_next.to(batch.device), x_cur, t_cur.to(batch.device), extra)

    def _pair_from_cache(self, batch: Batch) -> Pair:
        states, k = batch.traj["states"], self.o.skip_steps  # [B, K + 1, ...] at the cache grid ts
        last = int((self.ts > self.schedule.t_clean).sum()) - k  # the final pair may not end on clean data
        if last < 1:
            raise ConfigError(f"config key 'objective.skip_steps' is {k}; the trajectory cache has {last + k} usable steps")
        j = self.sample_index(batch, self.ts, last, len(states))
        rows, ts = torch.arange(len(states)), self.ts.to(batch.device)
        return Pair(states[rows, j].to(batch.device), ts[j.to(batch.device)], states[rows, j + k].to(batch.device),
                    ts[(j + k).to(batch.device)], {})

    def pair(self, batch: Batch) -> Pair:
        return self._pair_from_cache(batch) if self.o.source == "trajectories" else self._pair_from_data(batch)

    # -- the loss -------------------------------------------------------------------------------------
    def target_distance(self, f: torch.Tensor, p: Pair, cond) -> torch.Tensor:
        """d(f, f_theta-(x^_{t_n}, t_n)) per sample: the consistency target of every variant."""
        with torch.no_grad():
            f_target = self.target(p.x_cur, p.t_cur, cond, **p.extra)
        return distance(f, f_target.to(f.dtype), self.o.distance, self.o.huber_c)

    def loss(self, name, nets, batch):
        p = self.pair(batch)
        f = nets["student"](p.x_next, p.t_next, batch.cond, **p.extra)
        return self.target_distance(f, p, batch.cond)

    def after_update(self, name, nets, step):
        ema_update(self.target, unwrap(nets["student"]), self.o.target_ema)
