"""Primitives shared by the solvers (k-diffusion style): per-time coefficients and the DDIM step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distill.schedules import Schedule


@dataclass(frozen=True)
class Point:
    """One grid time with its coefficients as Python floats (float64)."""

    t: float
    alpha: float
    sigma: float
    lam: float  # log(alpha / sigma); +inf at the clean point

    @property
    def clean(self) -> bool:
        return self.sigma == 0.0


def grid_points(schedule: Schedule, ts: torch.Tensor) -> list[Point]:
    log_a, log_s = schedule.log_alpha_sigma(ts)
    return [
        Point(float(t), float(a), float(s), float(la - ls))
        for t, a, s, la, ls in zip(ts.tolist(), log_a.exp(), log_s.exp(), log_a, log_s)
    ]


def t_batch(p: Point, x: torch.Tensor) -> torch.Tensor:
    """The [B] time tensor a denoiser is called with."""
    return torch.full((x.shape[0],), p.t, dtype=torch.float64, device=x.device)


def ddim_step(x: torch.Tensor, x0: torch.Tensor, cur: Point, nxt: Point) -> torch.Tensor:
    """x_next = (sigma_n / sigma) x - alpha_n (e^{-h} - 1) x0: DDIM with eta = 0 (Song et al. 2021, Eq. 12),
    which is DPM-Solver++(1) (Lu et al. 2022b, Eq. 9) in data-prediction form, h = lam_n - lam."""
    if nxt.clean:
        return x0
    h = nxt.lam - cur.lam
    return (nxt.sigma / cur.sigma) * x - (nxt.alpha * math.expm1(-h)) * x0


def chart_scale(schedule: Schedule, p: Point) -> float:
    """c in the chart y = x / c, tau = sigma / c where the ODE reads dy/dtau = (y - D) / tau.

    EDM's chart c = alpha (tau = sigma / alpha = e^-lam); for rectified flow c = alpha + sigma = 1
    (tau = t), finite at t = 1 where alpha = 0.
    """
    return p.alpha + p.sigma if schedule.kind == "rectified_flow" else p.alpha
