"""SLAM: sub-path linear approximation model (Xu et al., ECCV 2024; official code MCG-NJU/SPLAM,
``train_splam_distill_sd_wds.py``), on the consistency-distillation skeleton of ``consistency.py``.

Per sample, with the pair x_s = x_{t_{n+k}} (noised data), x_e = x^_{t_n} (the teacher's step) and gamma ~ U[gamma_min, 1]:

    z_gamma = gamma x_s + (1 - gamma) (alpha_s / alpha_e) x_e                      (sub-path point, drift-corrected)
    sigma~_gamma^2 = (sigma_e alpha_s / alpha_e)^2 + gamma^2 (sigma_s^2 - (sigma_e alpha_s / alpha_e)^2)
    L = d( f_theta(z_gamma at its effective noise level, gamma),  f_theta-(x_e, t_n, gamma = 1) )

sigma~_gamma is the noise std of z_gamma when x_s is the forward transition of x_e from t_n to t_{n+k} (the
official code writes the VP case, sigma_s^2 - (.)^2 = 1 - (alpha_s / alpha_e)^2). The official code feeds the network
time t_{n+k} and converts its eps output with sigma~_gamma; here z_gamma = alpha_s x0 + sigma~_gamma eps is mapped
onto the forward process instead: the effective time t_gamma has alpha / sigma = alpha_s / sigma~_gamma, the state is
z_gamma alpha(t_gamma) / alpha_s, and the student is called there like at any time, so every teacher
parameterization (eps, v, x, flow) goes through the engine's one x0 conversion and a fresh student at any gamma is
the teacher's network exactly. gamma reaches the network through a zero-initialised embedding (``add_condition``,
default 1: the sampling value); ``gamma_min: 1`` is plain consistency distillation, bitwise. With ``guidance_range``
the student also takes w (a separate embedding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.core.param import append_dims
from distill.engine.config import at_least
from distill.objectives.base import register_objective
from distill.objectives.consistency import ConsistencyDistillation, ConsistencyOptions


@dataclass
class SlamOptions(ConsistencyOptions):
    gamma_min: float = at_least(0.0, 0.0, 1.0)  # gamma ~ U[gamma_min, 1]; 1: plain consistency distillation


def effective_sigma2(log_a_s, log_s_s, log_a_e, log_s_e, gamma: torch.Tensor) -> torch.Tensor:
    """sigma~_gamma^2 = (sigma_e r)^2 + gamma^2 (sigma_s^2 - (sigma_e r)^2), r = alpha_s / alpha_e (SPLAM code, any schedule)."""
    drifted = (2 * (log_s_e + log_a_s - log_a_e)).exp()
    return drifted + gamma**2 * ((2 * log_s_s).exp() - drifted)


def sub_path_point(schedule, x_s: torch.Tensor, t_s: torch.Tensor, x_e: torch.Tensor, t_e: torch.Tensor,
                   gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, t_gamma): SLAM's point z_gamma = gamma x_s + (1 - gamma) (alpha_s / alpha_e) x_e as a forward-process state
    alpha(t_gamma) x0 + sigma(t_gamma) eps at its effective time t_gamma (module doc); gamma = 1 returns (x_s, t_s)."""
    t_s, t_e, g = t_s.double().cpu(), t_e.double().cpu(), gamma.double().cpu()
    (log_a_s, log_s_s), (log_a_e, log_s_e) = schedule.log_alpha_sigma(t_s), schedule.log_alpha_sigma(t_e)
    r = (log_a_s - log_a_e).exp()
    z = append_dims(g, x_s.ndim).to(x_s) * x_s + append_dims((1 - g) * r, x_s.ndim).to(x_s) * x_e
    lam = log_a_s - effective_sigma2(log_a_s, log_s_s, log_a_e, log_s_e, g).log() / 2  # the schedule's lam = log(alpha / sigma)
    endpoint = g == 1
    t_gamma = torch.where(endpoint, t_s, schedule.t_of_lam(lam))
    scale = torch.where(endpoint, torch.ones_like(r), (schedule.log_alpha_sigma(t_gamma)[0] - log_a_s).exp())
    return append_dims(scale, z.ndim).to(z) * z, t_gamma.to(x_s.device)


@register_objective
class SubPathLinearApproximation(ConsistencyDistillation):
    name = "slam"
    Options = SlamOptions

    def add_conditions(self) -> None:
        super().add_conditions()
        self.student.add_condition("gamma", default=1.0)  # SLAM code: the w-embedding slot told gamma

    def sample_gamma(self, batch, size: int) -> torch.Tensor:
        return self.o.gamma_min + (1 - self.o.gamma_min) * batch.rand((size,), torch.float64)

    def loss(self, name, nets, batch):
        p = self.pair(batch)
        gamma = self.sample_gamma(batch, len(p.x_next))  # drawn after the pair: gamma = 1 sees CD's batch
        z, t_gamma = sub_path_point(self.schedule, p.x_next, p.t_next, p.x_cur, p.t_cur, gamma)
        f = nets["student"](z, t_gamma, batch.cond, gamma=gamma.to(z.device), **p.extra)
        return self.target_distance(f, p, batch.cond)
