"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"): a network of the average velocity
u(z_t, r, t) = 1 / (t - r) int_r^t v(z_tau, tau) dtau (Eq. 3) between times r <= t of the rectified-flow path
z_t = (1 - t) x + t eps, trained with the MeanFlow identity u = v - (t - r) d/dt u (Eq. 6):

    t, r ~ logit-normal(P_mean, P_std), t >= r (the larger of two draws), r = t for a share of the samples
    z_t = (1 - t) x + t eps,   v = the teacher's probability-flow velocity at (z_t, t)   (``velocity: teacher``)
                                 or eps - x, the path's conditional velocity        (``velocity: conditional``, the paper's)
    u_tgt = v - (t - r) (v d_z u + d_t u)      (Eq. 10; the JVP along (v, 0, 1) of Eq. 8, ``distill.core.jvp``, no gradient)
    L = sg(w) ||u_theta(z_t, r, t) - u_tgt||^2,   w = 1 / (||Delta||^2 + c)^p          (Sec. 4.3, adaptive loss weight)

Time chart. Every teacher's schedule x_s = alpha x0 + sigma eps is the rectified flow in the chart z = x / (alpha + sigma),
t = sigma / (alpha + sigma) (``distill.core.schedules.flow_time``: the flow time of the same log-SNR; the identity on a
rectified-flow schedule), where the probability-flow velocity is v = (z - D(x, s)) / t. MeanFlow's t and r live in that
chart; the networks see process time s = time_of_flow(t) and x = (alpha_s + sigma_s) z, as the teacher does.

Student. A ``NetDenoiser`` with one extra input, ``interval`` = t - r (the paper's (t, t - r) conditioning, "net(., t,
t - r)", Sec. 4.3, added with ``add_condition``: zero-initialised, so a copy of a teacher starts as its velocity at every
interval and exactly on the r = t diagonal): u_theta(z, r, t) = (z - D_theta(x, s; interval)) / t, the network's own
output for a flow network on a rectified-flow schedule. Sampling (``student.sampler: meanflow``): z_r = z_t - (t - r) u, one
DDIM step of the data prediction per interval (``students.student``), on times uniform in flow time the file records.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.core.jvp import METHODS, jvp
from distill.core.param import append_dims
from distill.core.schedules import flow_time, time_of_flow
from distill.engine.config import at_least, choice
from distill.objectives.base import Batch, Network, Objective, check_student_form, register_objective, unwrap

VELOCITIES = ("teacher", "conditional")
INTERVAL = "interval"  # the student's extra input t - r


@dataclass
class MeanFlowOptions:
    velocity: str = choice("teacher", VELOCITIES)  # teacher: its PF-ODE velocity (distillation); conditional: eps - x
    time_mean: float = -0.4  # P_mean of the logit-normal (t, r) sampler (official meanflow.py, ImageNet)
    time_std: float = at_least(1.0, 1e-6)  # P_std of the same
    equal_share: float = at_least(0.75, 0.0, 1.0)  # share of samples with r = t (official data_proportion; 25% r != t)
    norm_p: float = at_least(1.0, 0.0)  # p of the adaptive weight 1 / (||Delta||^2 + c)^p; 0: plain squared L2
    norm_eps: float = at_least(1e-3, 1e-12)  # c of the same (the paper's 1e-3; official JAX config 0.01)
    jvp: str = choice("auto", METHODS)  # forward mode (torch.func.jvp), central differences, or auto: forward, else differences
    # the interval's sinusoidal embedding scale: 1 embeds h in [0, 1] unscaled (as the official code embeds t and t - r);
    # 1000 as a diffusers UNet embeds its own time (0..999), so every frequency of the zero-initialised embedding varies
    interval_scale: float = at_least(1.0, 1e-6)


def average_velocity(net, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, cond, schedule) -> torch.Tensor:
    """u(z, r, t) = (z - D(x, s; interval = t - r)) / t in the flow chart (module doc); ``net`` is a student (a
    ``NetDenoiser`` with the ``interval`` input, DDP-wrapped or not), forward-mode differentiable in z and t."""
    s = time_of_flow(schedule, t)
    log_a, log_s = schedule.log_alpha_sigma(s)
    scale = append_dims(log_a.exp() + log_s.exp(), z.ndim).to(z)
    d = net(scale * z, s, cond, **{INTERVAL: t - r})
    return (z - d) / append_dims(t, z.ndim).to(z)


def teacher_velocity(denoise, z: torch.Tensor, t: torch.Tensor, cond, schedule) -> torch.Tensor:
    """The probability-flow velocity v = (z - D(x, s)) / t of a denoiser in the flow chart: eps^ - x^ (Liu et al. 2022)."""
    s = time_of_flow(schedule, t)
    log_a, log_s = schedule.log_alpha_sigma(s)
    scale = append_dims(log_a.exp() + log_s.exp(), z.ndim).to(z)
    return (z - denoise(scale * z, s.to(z.device), cond)) / append_dims(t, z.ndim).to(z)


@register_objective
class MeanFlow(Objective):
    name = "meanflow"
    needs = frozenset({"teacher", "data"})
    Options = MeanFlowOptions

    def __init__(self, options: MeanFlowOptions, ctx):
        super().__init__(options, ctx)
        self.teacher, self.student, self.schedule = ctx.teacher, ctx.student, ctx.teacher.schedule
        s = self.student
        check_student_form("meanflow", s, "meanflow", "denoiser", "an average-velocity student")
        if options.velocity == "conditional":
            self.needs = frozenset({"data"})
        self.jvp_method = options.jvp
        ends = flow_time(self.schedule, torch.tensor([self.schedule.t_min, self.schedule.t_max], dtype=torch.float64))
        self.t_lo, self.t_hi = float(ends[0]), float(ends[1])  # the teacher's trained times, in flow time
        s.add_condition(INTERVAL, scale=options.interval_scale)  # h in [0, 1], times interval_scale
        # k-step sampling times, uniform in flow time from the teacher's t_max (Alg. 2 and its k-step form z_r = z_t - (t - r) u)
        s.info["sampling_timesteps"] = {str(k): self.flow_uniform_times(k) for k in s.sampling_steps}
        s.info["meanflow"] = {"velocity": options.velocity, "time_mean": options.time_mean, "time_std": options.time_std,
                              "equal_share": options.equal_share, "norm_p": options.norm_p, "norm_eps": options.norm_eps,
                              "interval_scale": options.interval_scale}

    def flow_uniform_times(self, steps: int) -> list[float]:
        """``steps`` process times, uniform in flow time from the teacher's t_max (exactly t_max first)."""
        ts = time_of_flow(self.schedule, self.t_hi * (1 - torch.arange(steps, dtype=torch.float64) / steps))
        return [float(self.schedule.t_max), *ts[1:].tolist()]

    def networks(self) -> list[Network]:
        return [Network("student", self.student, betas=(0.9, 0.95), weight_decay=0.0)]  # official JAX: adamw, b2 0.95, wd 0

    def sample_times(self, batch: Batch, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, r) [B] float64: two logit-normal draws, t the larger, r = t with probability ``equal_share`` (official
        meanflow.py ``sample_tr``); t kept inside the teacher's trained times."""
        n = batch.randn((2, size), dtype=torch.float64).cpu()
        a, b = torch.sigmoid(self.o.time_mean + self.o.time_std * n)
        t = torch.maximum(a, b).clamp(self.t_lo, self.t_hi)
        r = torch.minimum(torch.minimum(a, b), t)
        equal = batch.rand((size,), dtype=torch.float64).cpu() < self.o.equal_share
        return t, torch.where(equal, t, r)

    def velocity(self, x: torch.Tensor, eps: torch.Tensor, z: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        if self.o.velocity == "conditional":
            return eps - x  # d z_t / dt on the path: the conditional velocity the paper trains with (after Eq. 10)
        return teacher_velocity(self.teacher.denoise, z, t, cond, self.schedule)

    def _fall_back(self, error: BaseException) -> None:
        self.jvp_method = "finite_difference"  # auto: the forward attempt failed once, skip it from now on

    def loss(self, name, nets, batch: Batch):
        x, cond = batch.x0, batch.cond
        t, r = self.sample_times(batch, len(x))
        eps = batch.randn(x.shape, x.dtype)
        tt = append_dims(t, x.ndim).to(x)
        z = (1 - tt) * x + tt * eps  # the flow path z_t = a_t x + b_t eps with a_t = 1 - t, b_t = t
        with torch.no_grad():
            v = self.velocity(x, eps, z, t, cond)
            student = unwrap(nets["student"])
            fn = lambda z_, t_: average_velocity(student, z_, t_, r, cond, self.schedule)  # noqa: E731
            _, dudt = jvp(fn, (z, t), (v, torch.ones_like(t)), method=self.jvp_method, on_fallback=self._fall_back)
            u_tgt = v - append_dims(t - r, x.ndim).to(x) * dudt  # Eq. 10: v - (t - r)(v d_z u + d_t u), stop-gradient
        u = average_velocity(nets["student"], z, t, r, cond, self.schedule)  # the differentiated call (DDP sees it)
        sq = (u - u_tgt).pow(2).flatten(1).sum(1)  # ||Delta||^2, summed over dimensions (official meanflow.py)
        weight = (sq.detach() + self.o.norm_eps).pow(-self.o.norm_p)  # Sec. 4.3: sg(w), w = 1 / (||Delta||^2 + c)^p
        return {"loss": weight * sq, "sq_error": sq.detach()}
