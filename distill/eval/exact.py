"""Exact metrics for analytic teachers: a float64 reference ODE solution and distribution distances."""

from __future__ import annotations

import math

import torch

from distill.core.schedules import Schedule
from distill.solvers.common import Point, chart_scale, grid_points


def _log_tau_of_lam(schedule: Schedule, lam: torch.Tensor) -> torch.Tensor:
    # EDM chart: tau = e^-lam; flow chart: tau = sigma / (alpha + sigma) = 1 / (1 + e^lam)
    return -torch.nn.functional.softplus(lam) if schedule.kind == "rectified_flow" else -lam


def _lam_of_log_tau(schedule: Schedule, u: float) -> float:
    return math.log(math.expm1(-u)) if schedule.kind == "rectified_flow" else -u


def _point_at(schedule: Schedule, t: float) -> Point:
    return grid_points(schedule, torch.tensor([float(t)], dtype=torch.float64))[0]


def ode_reference(denoiser, x: torch.Tensor, t_from: float, t_to: float, schedule: Schedule, *, cond=None,
                  steps: int = 1000) -> torch.Tensor:
    """The probability-flow ODE solved from ``x`` at ``t_from`` to ``t_to`` (sigma(t_to) > 0) by classical
    RK4 with ``steps`` uniform steps in u = log tau, on dy/du = y - D(c y, t) with y = x / c (the charts
    of ``distill.solvers.common.chart_scale``). Global error O((du)^4): float64 accuracy at the default."""
    if float(schedule.sigma(t_to)) == 0.0:
        raise ValueError("ode_reference needs sigma(t_to) > 0; denoise the result for the clean endpoint")
    lam0 = schedule.lam(t_from).clamp(min=-30.0)
    u0, u1 = float(_log_tau_of_lam(schedule, lam0)), float(_log_tau_of_lam(schedule, schedule.lam(t_to)))
    du = (u1 - u0) / steps
    x = x.double()

    def point(u: float) -> Point:
        return _point_at(schedule, float(schedule.t_of_lam(torch.tensor(_lam_of_log_tau(schedule, u)))))

    def f(y: torch.Tensor, u: float) -> torch.Tensor:
        p = point(u)
        c = chart_scale(schedule, p)
        t = torch.full((y.shape[0],), p.t, dtype=torch.float64)
        return y - denoiser(c * y, t, cond).double()

    y = x / chart_scale(schedule, _point_at(schedule, t_from))
    for i in range(steps):
        u = u0 + i * du
        k1 = f(y, u)
        k2 = f(y + 0.5 * du * k1, u + 0.5 * du)
        k3 = f(y + 0.5 * du * k2, u + 0.5 * du)
        k4 = f(y + du * k3, u + du)
        y = y + du / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return chart_scale(schedule, _point_at(schedule, t_to)) * y


def rmse(x: torch.Tensor, y: torch.Tensor) -> float:
    """Root mean squared difference over all samples and coordinates."""
    return float(((x.double() - y.double()) ** 2).mean().sqrt())


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, *, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equal-size sample sets (Rabin et al. 2011): the root mean
    over random unit directions of the squared W2 between the sorted 1-D projections."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs equal-size sets of equal dimension, got {list(x.shape)} and {list(y.shape)}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], n_projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, py = (x @ dirs).sort(dim=0).values, (y @ dirs).sort(dim=0).values
    return float(((px - py) ** 2).mean().sqrt())
