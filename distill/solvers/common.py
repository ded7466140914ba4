"""Primitives shared by the solvers (k-diffusion style): per-time coefficients and the DDIM step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
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


def multistep_order(order: int, i: int, steps: int, lower_order_final: bool) -> int:
    """Order of step ``i`` (0-based) of a ``steps``-step multistep solve: warm-up min(order, i + 1), and with
    ``lower_order_final`` also at most ``steps - i`` (the last step first order, as diffusers' UniPC/DEIS)."""
    return min(order, i + 1, steps - i) if lower_order_final else min(order, i + 1)


def lagrange_weights(nodes, lo: float, hi: float, *, exp_weight: bool = False) -> list[float]:
    """w_j = int_lo^hi L_j(s) ds, or int_lo^hi e^-s L_j(s) ds with ``exp_weight``, where L_j is the Lagrange
    basis polynomial of node j: the weights of an Adams-Bashforth step (of an exponential-integrator one).

    Closed forms, exact up to rounding: int e^-s P(s) ds = -e^-s (P + P' + P'' + ...); computed in s - lo.
    """
    poly = np.polynomial.Polynomial
    v, span = [float(s) - lo for s in nodes], hi - lo
    weights = []
    for j, vj in enumerate(v):
        others = v[:j] + v[j + 1:]
        basis = poly.fromroots(others) / math.prod(vj - vk for vk in others) if others else poly([1.0])
        if exp_weight:
            q = sum((basis.deriv(k) for k in range(1, basis.degree() + 1)), basis)
            weights.append(math.exp(-lo) * float(q(0.0) - math.exp(-span) * q(span)))
        else:
            antideriv = basis.integ()
            weights.append(float(antideriv(span) - antideriv(0.0)))
    return weights
