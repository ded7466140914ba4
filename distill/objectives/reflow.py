"""Reflow (Liu et al. 2022, "Flow Straight and Fast", Sec. 2.3) and Rectified Diffusion (Wang et al. 2024), with the
phased variant (PeRFlow, Yan et al. 2024; Rectified Diffusion's ``train_phased.py``).

The coupling is fixed: a trajectory cache of the teacher's ODE (``scripts/make_trajectories.py``) pairs each initial
state z_T (its exact noise) with the teacher's sample x_0. The student is retrained in the teacher's own
parameterization and schedule on the first-order (DDIM) path through the pair:

    u ~ U(t_e, t_s],   x0* = the x0 with DDIM(z_s, x0, s -> e) = x_e,   x_u = DDIM(z_s, x0*, s -> u)
                                           = alpha_u x0* + sigma_u eps*,  eps* = (z_s - alpha_s x0*) / sigma_s
    L = d( D_student(x_u, u), x0* )        (``denoising_loss`` in x0 space: huber, l2 or pseudo_huber; ``raw``: own output)

With one phase (s = t_max, e = clean) x0* is the pair's sample and x_u = alpha_u x0 + sigma_u eps_pair with
eps_pair = (z_T - alpha_T x0) / sigma_T: Rectified Diffusion's x_t = alpha_t x0_pair + sigma_t eps_pair (their
``train.py``), and on a rectified-flow schedule (alpha = 1 - t, sigma = t) the straight line X_t = t X1 + (1 - t) X0
of k-rectified flow (Liu et al. 2022, Eq. 1), whose minimiser is the same conditional mean. With K phases the
boundaries are K + 1 points of the cache grid (states z_s, x_e from the cache), the student learns each phase's
first-order jump and samples with one DDIM step per phase (PeRFlow; the DDIM line through z_s and x_e is the
constant-eps* path of ``train_phased.py``: both are alpha_u a + sigma_u b through the two points). ``one_step``
trains at u = s only: the regression of each phase end from its start (Liu et al. 2022, Sec. 2.3, "distillation":
Z1 from Z0 on the pairs). Rounds: 2-, 3-rectified by ``teacher: student:<file>`` + ``init_from`` and a cache made
by that student.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distill.core.param import eps_from_x0
from distill.core.schedules import integer_times
from distill.engine.config import ConfigError, at_least, choice
from distill.objectives.base import Batch, Network, Objective, register_objective
from distill.objectives.diffusion import drop_labels
from distill.objectives.losses import DISTANCES, LOSS_SPACES, denoising_loss
from distill.objectives.progressive import check_ode_student, ddim_inverse
from distill.solvers.common import grid_points


@dataclass
class ReflowOptions:
    phases: int = at_least(1, 1)  # K: 1 = reflow / Rectified Diffusion; K > 1 = phased, one DDIM step per phase
    # null: huber in x0 space (Rectified Diffusion's train.py: per-element pseudo-Huber, c 0.001), l2 in raw space
    distance: str | None = choice(None, (None, *DISTANCES))
    huber_c: float | None = None  # c of huber (null: 0.001) or pseudo_huber (null: 0.00054 sqrt(data dimension))
    space: str = choice("x0", LOSS_SPACES)  # x0: data-prediction error; raw: the network's own output (l2 only)
    one_step: bool = False  # u = each phase's start only: regress its end from its start (one-step distillation)
    label_dropout: float = at_least(0.0, 0.0, 1.0)  # probability of training a pair as unconditional (CFG)
    # phased, continuous time: each later phase is sampled from this fraction of its length inside it, not at its
    # start, where the target jumps from the previous phase's line and the network blends the two
    phase_inset: float = at_least(0.01, 0.0, 0.5)


def phase_bounds(num_points: int, phases: int, key: str = "phases", grid: str = "the trajectory cache") -> list[int]:
    """Indices of the K + 1 phase boundaries among a cache grid's points, evenly spread, first and last included
    (``key``, ``grid``: the option and the grid an error names)."""
    if phases > num_points - 1:
        raise ConfigError(f"config key 'objective.{key}' is {phases}, but {grid} has only "
                          f"{num_points - 1} steps; allowed: 1 to {num_points - 1}")
    return [round(k * (num_points - 1) / phases) for k in range(phases + 1)]


def phase_starts(ts: torch.Tensor, bounds: list[int], discrete: bool, inset: float) -> list[float]:
    """The time each phase's one sampling step starts from. Continuous time: later phases ``inset`` of their length
    inside, away from the jump at the shared boundary. Integer times: phase k trains on floor(e)+1 .. floor(s), so a
    later phase starts at floor(s), its own largest time (a fractional start such as 732.6 lies between two phases'
    trained times); the previous phase's DDIM step lands there on the same line, as the line holds for every u."""
    starts = [float(ts[i]) for i in bounds[:-1]]
    if discrete:
        return starts[:1] + [float(math.floor(s)) for s in starts[1:]]
    ends = [float(ts[i]) for i in bounds[1:]]
    return starts[:1] + [s - inset * (s - e) for s, e in zip(starts[1:], ends[1:])]


def phase_pair(z_s: torch.Tensor, x_e: torch.Tensor, s, e) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0*, eps*) of the DDIM line from z_s at s that lands on x_e at e (``Point``s; x0* = x_e for a clean e): a DDIM
    step with a constant x0 keeps the implied eps, so the line is x_u = alpha_u x0* + sigma_u eps* for every u."""
    x0 = x_e if e.clean else ddim_inverse(z_s, x_e, s, e)
    return x0, eps_from_x0(x0, z_s, s.alpha, s.sigma)


@register_objective
class Reflow(Objective):
    name = "reflow"
    needs = frozenset({"trajectories"})
    Options = ReflowOptions
    cache_keys = ("noise", "sample", "label")

    def __init__(self, options: ReflowOptions, ctx):
        super().__init__(options, ctx)
        self.student, self.schedule, cache = ctx.student, ctx.teacher.schedule, ctx.cache
        if cache is None:
            raise ConfigError("objective 'reflow' retrains on the teacher's (noise, sample) pairs: set config key "
                              "'trajectories' to a cache made by scripts/make_trajectories.py with this teacher")
        if options.distance is None:
            options.distance = "l2" if options.space == "raw" else "huber"
        if options.space == "raw" and options.distance != "l2":
            raise ConfigError(f"config key 'objective.distance' is {options.distance!r}, but space 'raw' is l2 only; "
                              f"allowed with raw: l2 (or set objective.space x0)")
        check_ode_student(self.student, self.name)
        self.ts = cache.ts
        self.bounds = phase_bounds(len(self.ts), options.phases)
        self.points = grid_points(self.schedule, self.ts)
        if options.phases > 1:
            self.cache_keys = ("states", "label")
            starts = phase_starts(self.ts, self.bounds, integer_times(self.schedule), options.phase_inset)
            self.student.sampling_steps = (options.phases,)
            self.student.info["sampling_timesteps"] = {str(options.phases): starts}
        self.student.info["reflow"] = {"phases": options.phases, "one_step": options.one_step,
                                       "pairs": cache.manifest.get("num_samples"), "pair_solver": cache.manifest.get("solver"),
                                       "pair_nfe": cache.manifest.get("nfe")}

    def networks(self) -> list[Network]:
        return [Network("student", self.student)]

    def _ends(self, batch: Batch):
        """(phase k [B], z_s, x_e) of each pair."""
        traj, n = batch.traj, batch.size
        if self.o.phases == 1:
            scale = float(self.schedule.init_noise_scale(self.ts[0]))
            return torch.zeros(n, dtype=torch.long), traj["noise"] * scale, traj["sample"]
        k = torch.randint(0, self.o.phases, (n,), generator=batch.g)
        bounds, rows = torch.tensor(self.bounds), torch.arange(n)
        return k, traj["states"][rows, bounds[k]], traj["states"][rows, bounds[k + 1]]

    def _times(self, k: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """u ~ U(t_e, t_s] in each pair's phase (integer timesteps for a discrete schedule), or t_s with ``one_step``."""
        bounds = torch.tensor(self.bounds)
        s, e = self.ts[bounds[k]], self.ts[bounds[k + 1]]
        r = torch.rand(len(k), generator=g, dtype=torch.float64)
        if self.o.one_step:
            return s
        if integer_times(self.schedule):
            lo, hi = (e.floor() + 1).clamp(min=self.schedule.t_min), s.floor()
            return (lo + (r * (hi - lo + 1)).floor()).clamp(max=s)
        return s - (s - e.clamp(min=self.schedule.t_min)) * r

    def loss(self, name, nets, batch: Batch):
        k, z_s, x_e = self._ends(batch)
        u = self._times(k, batch.g)
        cond = drop_labels(batch.cond, self.o.label_dropout, batch.g)
        z_s, x_e = z_s.to(batch.device), x_e.to(batch.device)
        x0, eps = torch.empty_like(z_s), torch.empty_like(z_s)
        for kk in k.unique().tolist():
            m = (k == kk).to(batch.device)
            x0[m], eps[m] = phase_pair(z_s[m], x_e[m], self.points[self.bounds[kk]], self.points[self.bounds[kk + 1]])
        # x_u = alpha_u x0* + sigma_u eps*: Rectified Diffusion's x_t from the pair (add_noise inside the shared loss)
        return denoising_loss(nets["student"], x0, u.to(batch.device), eps, cond, space=self.o.space,
                              kind=self.o.distance, huber_c=self.o.huber_c)
