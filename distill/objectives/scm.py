"""sCM (Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-time Consistency Models"): a consistency model
trained in continuous time on the TrigFlow path x_t = cos(t) x0 + sin(t) z, z ~ N(0, sigma_d^2 I), t in [0, pi/2]
(Sec. 2), with the stop-gradient objective of Algorithm 1:

    tau ~ N(P_mean, P_std^2),  t = arctan(e^tau / sigma_d),  x_t = cos(t) x0 + sin(t) z
    dx_t/dt = the teacher's probability-flow velocity at (x_t, t)              (``velocity: teacher``, sCD)
              or cos(t) z - sin(t) x0, the path's conditional velocity        (``velocity: data``, sCT)
    f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t)                 (Eq. 6, the consistency function)
    g = cos(t) [r df-/dt - (1 - r) cos(t) (sigma_d F- - dx_t/dt)]               (Alg. 1 "JVP rearrangement" and tangent
        warm-up r = min(1, step / H); df-/dt = a JVP of f- along (dx_t/dt, 1), ``distill.core.jvp``, stop-gradient)
    g <- g / (||g|| + c)                                                      (Sec. 4.3, tangent normalization)
    L = e^{w(t)} / D ||F_theta - F_theta- - g||^2 - w(t)                       (Alg. 1, adaptive weighting, Sec. 4.4)

With r = 1, g = cos(t) df-/dt (Eq. 8: df/dt = -cos(t)(sigma_d F - dx_t/dt) - sin(t)(x_t + sigma_d dF/dt)); the r = 0 end
keeps only the first term.

TrigFlow chart of any teacher. A teacher's x_s = alpha_s x0 + sigma_s eps is the TrigFlow path at the time with the same
log-SNR, sigma_d tan(t) = sigma_s / alpha_s (``distill.core.schedules.trig_time``: t = atan2(sigma, alpha sigma_d)), in
the chart x_t = x_s cos(t) / alpha_s = x_s sigma_d / sqrt(alpha_s^2 sigma_d^2 + sigma_s^2) (``trig_scale``): x_s / alpha_s =
x0 + (sigma_s / alpha_s) eps is EDM's chart, and cos(t) (x0 + sigma_d tan(t) eps) = cos(t) x0 + sin(t) sigma_d eps. The
networks see process time s = time_of_trig(t) and x_s = trig_scale(s) x_t, as the teacher was trained (NVlabs FastGen's
``TrigFlowPrecond`` does the same). With the denoiser D(x_s, s) = E[x0 | x_t], E[z | x_t] = (x_t - cos(t) D) / sin(t), so
the probability-flow velocity is dx_t/dt = E[cos(t) z - sin(t) x0 | x_t] = (cos(t) x_t - D) / sin(t) (``trig_velocity``).

Student. A ``Student`` with ``parameterization: denoiser`` and ``sampler: consistency``: f(x_t, t) = D_theta(x_s, s)
(``consistency_function``), i.e. F = (cos(t) x_t - D_theta) / (sigma_d sin(t)) -- the paper's parameterization with F
read off the network's data prediction (exact, invertible for t > 0). A copy of a teacher therefore starts as exactly
the teacher's denoiser at every t (the paper's F_theta = F_pretrain gives the same f). The loss needs only
F_theta - F_theta- = (f- - f_theta) / (sigma_d sin(t)) and sigma_d F- = (cos(t) x_t - f-) / sin(t).
Sampling is multistep consistency sampling (``students.student``, ``consistency``): f at the teacher's t_max (TrigFlow
pi/2 on a flow schedule), then re-noise at TrigFlow time ``mid_time`` (1.1, the paper's two-step time) and apply f again.

Adaptive weight w(t) (``weighting: adaptive``): a second trained network, ``weighting`` (fixed Fourier features of t
and a zero-initialised linear layer, EDM2's log-variance head: Karras et al. 2024, Sec. 5). Its loss and the student's
are the two partial gradients of the joint L: the student's step uses w detached, the weighting's step the student's
squared error of the same micro-batch, detached. ``weighting: uniform`` fixes w = 0 (the plain mean squared error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from distill.core.jvp import METHODS, jvp
from distill.core.param import append_dims
from distill.core.schedules import time_of_trig, trig_scale, trig_time
from distill.engine.config import ConfigError, at_least, choice
from distill.objectives.base import Batch, Network, Objective, check_student_form, register_objective, unwrap

VELOCITIES = ("teacher", "data")
WEIGHTINGS = ("adaptive", "uniform")


@dataclass
class SCMOptions:
    velocity: str = choice("teacher", VELOCITIES)  # teacher: its PF-ODE velocity (sCD); data: cos(t) z - sin(t) x0 (sCT)
    sigma_data: float = at_least(0.5, 1e-6)  # sigma_d of TrigFlow (the data std; the paper's 0.5)
    time_mean: float = -1.0  # P_mean of tau = log(sigma_d tan t) (paper App. G, CIFAR-10)
    time_std: float = at_least(1.4, 1e-6)  # P_std of the same
    warmup_steps: int = at_least(0, 0)  # H: tangent warm-up r = min(1, step / H); 0: r = 1 from the start
    tangent_c: float = at_least(0.1, 0.0)  # c of the tangent normalization g / (||g|| + c)
    weighting: str = choice("adaptive", WEIGHTINGS)  # adaptive: the learned w(t) network; uniform: w = 0
    weight_features: int = at_least(128, 1)  # Fourier features of the w(t) network
    mid_time: float = at_least(1.1, 1e-3, math.pi / 2)  # TrigFlow time of the 2-step sampler's second step (paper: 1.1)
    jvp: str = choice("auto", METHODS)  # forward mode, central differences, or auto: forward, else differences


def consistency_function(net, x_t: torch.Tensor, t: torch.Tensor, cond, schedule, sigma_data: float) -> torch.Tensor:
    """f(x_t, t) = D_theta(x_s, s) at the process time s of TrigFlow time t, x_s = trig_scale(s) x_t (module doc);
    forward-mode differentiable in x_t and t."""
    s = time_of_trig(schedule, t, sigma_data)
    return net(append_dims(trig_scale(schedule, s, sigma_data), x_t.ndim).to(x_t) * x_t, s, cond)


def trig_velocity(denoise, x_t: torch.Tensor, t: torch.Tensor, cond, schedule, sigma_data: float) -> torch.Tensor:
    """The probability-flow velocity dx_t/dt = (cos(t) x_t - D(x_s, s)) / sin(t) of a denoiser in the TrigFlow chart."""
    s = time_of_trig(schedule, t, sigma_data)
    d = denoise(append_dims(trig_scale(schedule, s, sigma_data), x_t.ndim).to(x_t) * x_t, s.to(x_t.device), cond)
    cos, sin = (append_dims(v, x_t.ndim).to(x_t) for v in (t.cos(), t.sin()))
    return (cos * x_t - d) / sin


class TimeWeighting(nn.Module):
    """w(t): fixed Fourier features sqrt(2) cos(2 pi (f t + phi)), f ~ N(0, 1), phi ~ U[0, 1) (EDM2's MPFourier, seeded),
    and a zero-initialised linear layer, so that w = 0 at the start."""

    def __init__(self, features: int = 128):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(features, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(features, generator=g))
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.freqs)
        return self.linear(math.sqrt(2) * torch.cos(t[:, None] * self.freqs + self.phases)).squeeze(1)


@register_objective
class SCM(Objective):
    name = "scm"
    needs = frozenset({"teacher", "data"})
    Options = SCMOptions

    def __init__(self, options: SCMOptions, ctx):
        super().__init__(options, ctx)
        self.teacher, self.student, self.schedule = ctx.teacher, ctx.student, ctx.teacher.schedule
        s = self.student
        check_student_form("scm", s, "consistency", "denoiser", "f = D_theta in the TrigFlow chart")
        if options.velocity == "data":
            self.needs = frozenset({"data"})
        self.jvp_method = options.jvp
        ends = trig_time(self.schedule, torch.tensor([self.schedule.t_min, self.schedule.t_max], dtype=torch.float64),
                         options.sigma_data)
        self.t_lo, self.t_hi = float(ends[0]), float(ends[1])  # the teacher's trained times, in TrigFlow time
        if not self.t_lo < options.mid_time < self.t_hi:
            raise ConfigError(f"config key 'objective.mid_time' is {options.mid_time}; allowed: TrigFlow times between "
                              f"{self.t_lo:.4g} and {self.t_hi:.4g} (the teacher's t_min and t_max)")
        self.weighting = TimeWeighting(options.weight_features) if options.weighting == "adaptive" else None
        self._terms: list = []  # (batch, t, squared error) of this step's student losses, for the weighting's loss
        s.info["sampling_timesteps"] = {str(k): self.sampling_times(k) for k in s.sampling_steps}
        s.info["scm"] = {"velocity": options.velocity, "sigma_data": options.sigma_data, "time_mean": options.time_mean,
                         "time_std": options.time_std, "warmup_steps": options.warmup_steps, "tangent_c": options.tangent_c,
                         "weighting": options.weighting, "mid_time": options.mid_time}

    def sampling_times(self, steps: int) -> list[float]:
        """Process times of a ``steps``-step sample: the teacher's t_max, then TrigFlow times mid_time (k - j) / (k - 1),
        j = 1 .. k - 1 (the paper's pi/2 and 1.1 for two steps; more steps are our spacing), kept above t_min."""
        trig = [self.o.mid_time * (steps - j) / (steps - 1) for j in range(1, steps)]
        ts = time_of_trig(self.schedule, torch.tensor(trig, dtype=torch.float64).clamp_min(self.t_lo), self.o.sigma_data)
        return [float(self.schedule.t_max), *ts.tolist()]

    def networks(self) -> list[Network]:
        nets = [Network("student", self.student)]
        return nets + ([Network("weighting", self.weighting, weight_decay=0.0)] if self.weighting is not None else [])

    def sample_times(self, batch: Batch, size: int) -> torch.Tensor:
        """t [B] float64: tan(t) = e^tau / sigma_d, tau ~ N(P_mean, P_std^2) (Alg. 1), inside the teacher's trained times."""
        tau = self.o.time_mean + self.o.time_std * batch.randn((size,), dtype=torch.float64).cpu()
        return torch.atan(tau.exp() / self.o.sigma_data).clamp(self.t_lo, self.t_hi)

    def velocity(self, x0, z, x_t, t, cond) -> torch.Tensor:
        if self.o.velocity == "data":
            cos, sin = (append_dims(v, x0.ndim).to(x0) for v in (t.cos(), t.sin()))
            return cos * z - sin * x0  # Alg. 1, consistency training: d/dt of the path
        return trig_velocity(self.teacher.denoise, x_t, t, cond, self.schedule, self.o.sigma_data)

    def warmup(self, step: int) -> float:
        return min(1.0, step / self.o.warmup_steps) if self.o.warmup_steps > 0 else 1.0  # Alg. 1, tangent warm-up

    def _fall_back(self, error: BaseException) -> None:
        self.jvp_method = "finite_difference"  # auto: the forward attempt failed once, skip it from now on

    def tangent(self, f_minus, dfdt, x_t, v, t, r: float) -> torch.Tensor:
        """g = cos(t) [r df-/dt - (1 - r) cos(t) (sigma_d F- - dx_t/dt)], normalized g / (||g|| + c) (module doc)."""
        cos, sin = (append_dims(u, x_t.ndim).to(x_t) for u in (t.cos(), t.sin()))
        sd_f = (cos * x_t - f_minus) / sin  # sigma_d F- from f- = cos(t) x_t - sin(t) sigma_d F-
        g = cos * (r * dfdt - (1 - r) * cos * (sd_f - v))
        norm = g.flatten(1).norm(dim=1)
        return g / append_dims(norm + self.o.tangent_c, g.ndim)

    def weight(self, nets, t: torch.Tensor) -> torch.Tensor:
        if self.weighting is None:
            return torch.zeros_like(t, dtype=torch.float32)
        return nets.get("weighting", self.weighting)(t)

    def student_terms(self, nets, batch: Batch):
        """(t, ||F_theta - F_theta- - g||^2 / D) per sample, the second with gradient to the student."""
        x0, cond, sd = batch.x0, batch.cond, self.o.sigma_data
        t = self.sample_times(batch, len(x0))
        z = sd * batch.randn(x0.shape, x0.dtype)
        cos, sin = (append_dims(u, x0.ndim).to(x0) for u in (t.cos(), t.sin()))
        x_t = cos * x0 + sin * z
        with torch.no_grad():
            v = self.velocity(x0, z, x_t, t, cond)
            student = unwrap(nets["student"])
            fn = lambda x_, t_: consistency_function(student, x_, t_, cond, self.schedule, sd)  # noqa: E731
            f_minus, dfdt = jvp(fn, (x_t, t), (v, torch.ones_like(t)), method=self.jvp_method, on_fallback=self._fall_back)
            g = self.tangent(f_minus, dfdt, x_t, v, t, self.warmup(batch.step))
        f = consistency_function(nets["student"], x_t, t, cond, self.schedule, sd)  # the differentiated call (DDP sees it)
        diff = (f_minus - f) / (sd * sin)  # F_theta - F_theta-: zero in value, the student's gradient
        return t, (diff - g).pow(2).flatten(1).mean(1)

    def loss(self, name, nets, batch: Batch):
        if name == "weighting":
            return self.weighting_loss(nets, batch)
        t, sq = self.student_terms(nets, batch)
        self._terms = [e for e in self._terms if e[0].step == batch.step] + [(batch, t, sq.detach())]
        with torch.no_grad():
            w = self.weight(nets, t).to(sq)
        return {"loss": w.exp() * sq - w, "sq_error": sq.detach(), "w": w}  # Alg. 1 with w held fixed

    def weighting_loss(self, nets, batch: Batch):
        """e^w sq - w with the student's squared error of this micro-batch held fixed (the other partial gradient)."""
        cached = [e for e in self._terms if e[0] is batch]
        if cached:
            _, t, sq = cached[0]
        else:  # the student did not update on this batch: its error without gradient
            with torch.no_grad():
                t, sq = self.student_terms(nets, batch)
        w = nets["weighting"](t).to(sq)
        return {"loss": w.exp() * sq - w, "sq_error": sq, "w": w.detach()}
