"""SLAM: sub-path linear approximation model (Xu et al., ECCV 2024; official code MCG-NJU/SPLAM,
``train_splam_distill_sd_wds.py``), on the consistency-distillation skeleton of ``consistency.py``.

Per sample, with the pair x_s = x_{t_{n+k}} (noised data), x_e = x^_{t_n} (the teacher's step) and gamma ~ U[gamma_min, 1]:

    z_gamma = gamma x_s + (1 - gamma) (alpha_s / alpha_e) x_e                      (sub-path point, drift-corrected)
    L = d( f_theta(z_gamma, gamma),  f_theta-(x_e, t_n, gamma = 1) )

Where the student reads z_gamma (``sub_path``):

  * ``ddim_line`` (default): z_gamma is labelled with the time it has on the teacher's trajectory. x_e is the teacher's
    step from x_s, so both share the noise direction of that step: x_s = alpha_s x0^ + sigma_s eps^ and
    x_e = alpha_e x0^ + sigma_e eps^ on the DDIM line, hence z_gamma / alpha_s = x0^ + sigma~_gamma eps^ with
        sigma~_gamma = gamma sigma_s / alpha_s + (1 - gamma) sigma_e / alpha_e           (linear in EDM's sigma / alpha)
    The effective time t_gamma has sigma / alpha = sigma~_gamma, the state is z_gamma alpha(t_gamma) / alpha_s, and the
    student is called there like at any time, so every teacher parameterization (eps, v, x, flow) goes through the
    engine's one x0 conversion. The point lies on the teacher's ODE trajectory up to the teacher's own step error.
  * ``official``: the official code's form: the network sees z_gamma at time t_{n+k} with the gamma code, and its eps
    output becomes x0 = (z_gamma - s_gamma eps) / alpha_s with the official noise std
        s_gamma^2 = (sigma_e alpha_s / alpha_e)^2 + gamma^2 (sigma_s^2 - (sigma_e alpha_s / alpha_e)^2)
    (exact when x_s and x_e carry independent noise, not for a distillation pair). The official code has an
    eps-prediction network; another parameterization's output is first read as the eps it means at t_{n+k}
    (v, x0 or flow at alpha_s, sigma_s), our extension.

Labelling z_gamma at s_gamma's time as a forward-process state (before 0.2.0) put it 4-15% below its noise level on the
mnist16 schedule, off the teacher's trajectory; see ``../shared/ALGORITHMS.md`` 2.2. gamma reaches the network through a
zero-initialised embedding (``add_condition``, default 1: the sampling value); ``gamma_min: 1`` is plain consistency
distillation, bitwise. With ``guidance_range`` the student also takes w (a separate embedding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.core.param import append_dims, eps_from_x0, to_x0
from distill.engine.config import at_least, choice
from distill.objectives.base import register_objective, unwrap
from distill.objectives.consistency import ConsistencyDistillation, ConsistencyOptions

SUB_PATHS = ("ddim_line", "official")


@dataclass
class SlamOptions(ConsistencyOptions):
    gamma_min: float = at_least(0.0, 0.0, 1.0)  # gamma ~ U[gamma_min, 1]; 1: plain consistency distillation
    sub_path: str = choice("ddim_line", SUB_PATHS)  # ddim_line: z_gamma at its trajectory time; official: at t_{n+k} (doc)


def effective_sigma2(log_a_s, log_s_s, log_a_e, log_s_e, gamma: torch.Tensor) -> torch.Tensor:
    """s_gamma^2 = (sigma_e r)^2 + gamma^2 (sigma_s^2 - (sigma_e r)^2), r = alpha_s / alpha_e: the official code's noise
    std of z_gamma (SPLAM's train_splam_distill_sd_wds.py, written for any schedule); the ``official`` form's eps -> x0."""
    drifted = (2 * (log_s_e + log_a_s - log_a_e)).exp()
    return drifted + gamma**2 * ((2 * log_s_s).exp() - drifted)


def sub_path_mix(schedule, x_s: torch.Tensor, t_s: torch.Tensor, x_e: torch.Tensor, t_e: torch.Tensor,
                 g: torch.Tensor) -> torch.Tensor:
    """z_gamma = gamma x_s + (1 - gamma) (alpha_s / alpha_e) x_e (the official code's sub-path point, any schedule)."""
    r = (schedule.log_alpha_sigma(t_s.double().cpu())[0] - schedule.log_alpha_sigma(t_e.double().cpu())[0]).exp()
    g = g.double().cpu()
    return append_dims(g, x_s.ndim).to(x_s) * x_s + append_dims((1 - g) * r, x_s.ndim).to(x_s) * x_e


def sub_path_point(schedule, x_s: torch.Tensor, t_s: torch.Tensor, x_e: torch.Tensor, t_e: torch.Tensor,
                   gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, t_gamma): SLAM's point z_gamma = gamma x_s + (1 - gamma) (alpha_s / alpha_e) x_e as the state
    alpha(t_gamma) / alpha_s z_gamma at its time on the DDIM line through x_s and x_e, sigma(t_gamma) / alpha(t_gamma) =
    gamma sigma_s / alpha_s + (1 - gamma) sigma_e / alpha_e (module doc); gamma = 1 returns (x_s, t_s)."""
    t_s, t_e, g = t_s.double().cpu(), t_e.double().cpu(), gamma.double().cpu()
    (log_a_s, log_s_s), (log_a_e, log_s_e) = schedule.log_alpha_sigma(t_s), schedule.log_alpha_sigma(t_e)
    r = (log_a_s - log_a_e).exp()
    z = sub_path_mix(schedule, x_s, t_s, x_e, t_e, g)
    edm_sigma = g * (log_s_s - log_a_s).exp() + (1 - g) * (log_s_e - log_a_e).exp()  # sigma / alpha of z_gamma
    endpoint = g == 1
    t_gamma = torch.where(endpoint, t_s, schedule.t_of_lam(-edm_sigma.log()))  # the schedule's lam = log(alpha / sigma)
    log_a_g, log_s_g = schedule.log_alpha_sigma(t_gamma)
    # alpha(t_gamma) / alpha_s; where alpha_s = 0 (a flow teacher's t = 1) the equal sigma(t_gamma) / sigma_z, sigma_z =
    # g sigma_s + (1 - g) r sigma_e the noise std of z_gamma, which has no 0 / 0
    by_sigma = (log_s_g - (g * log_s_s.exp() + (1 - g) * r * log_s_e.exp()).log()).exp()
    scale = torch.where(endpoint, torch.ones_like(r), torch.where(log_a_s.isfinite(), (log_a_g - log_a_s).exp(), by_sigma))
    return append_dims(scale, z.ndim).to(z) * z, t_gamma.to(x_s.device)


def official_x0(schedule, z: torch.Tensor, eps: torch.Tensor, t_s: torch.Tensor, t_e: torch.Tensor,
                gamma: torch.Tensor) -> torch.Tensor:
    """x0 = (z_gamma - s_gamma eps) / alpha_s, the official code's conversion of the network's eps at time t_{n+k}."""
    t_s, t_e, g = t_s.double().cpu(), t_e.double().cpu(), gamma.double().cpu()
    (log_a_s, log_s_s), (log_a_e, log_s_e) = schedule.log_alpha_sigma(t_s), schedule.log_alpha_sigma(t_e)
    s_gamma = effective_sigma2(log_a_s, log_s_s, log_a_e, log_s_e, g).sqrt()
    return (z - append_dims(s_gamma, z.ndim).to(z) * eps) / append_dims(log_a_s.exp(), z.ndim).to(z)


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
        if self.o.sub_path == "official":
            f = self.official_student(nets["student"], p, gamma, batch.cond)
        else:
            z, t_gamma = sub_path_point(self.schedule, p.x_next, p.t_next, p.x_cur, p.t_cur, gamma)
            f = nets["student"](z, t_gamma, batch.cond, gamma=gamma.to(z.device), **p.extra)
        return self.target_distance(f, p, batch.cond)

    def official_student(self, net, p, gamma: torch.Tensor, cond) -> torch.Tensor:
        """f_theta at the official code's input: z_gamma at time t_{n+k}, its eps output converted with s_gamma."""
        z = sub_path_mix(self.schedule, p.x_next, p.t_next, p.x_cur, p.t_cur, gamma)
        raw = net(z, p.t_next, cond, raw=True, gamma=gamma.to(z.device), **p.extra)
        prediction = unwrap(net).prediction_type
        if prediction == "epsilon":
            eps = raw
        else:  # the eps the output means at t_{n+k} (module doc)
            log_a, log_s = self.schedule.log_alpha_sigma(p.t_next.double().cpu())
            eps = eps_from_x0(to_x0(raw, prediction, z, log_a.exp(), log_s.exp()), z, log_a.exp(), log_s.exp())
        x0 = official_x0(self.schedule, z, eps, p.t_next, p.t_cur, gamma)
        return unwrap(net).from_data_prediction(z, p.t_next, x0)
