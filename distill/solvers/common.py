"""Primitives shared by the solvers (k-diffusion style): per-time coefficients and the DDIM step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distill.core.schedules import Schedule


@dataclass(frozen=True)
class Point:
    """One grid time with its coefficients as Python floats (float64), or, for a time that differs per sample
    (``sample_point``: AMED's predicted intermediate times), as tensors shaped to broadcast against x."""

    t: float
    alpha: float
    sigma: float
    lam: float  # log(alpha / sigma); +inf at the clean point

    @property
    def clean(self) -> bool:
        return isinstance(self.sigma, float) and self.sigma == 0.0


def sample_point(schedule: Schedule, lam: torch.Tensor, x: torch.Tensor) -> Point:
    """A per-sample Point at log-SNR ``lam`` [B] (finite): t [B] for the denoiser, coefficients [B, 1, ...] in x's dtype.
    Differentiable in ``lam`` (AMED trains through it)."""
    t = schedule.t_of_lam(lam)
    log_a, log_s = schedule.log_alpha_sigma(t)
    shape = (-1,) + (1,) * (x.ndim - 1)
    col = lambda v: v.reshape(shape).to(device=x.device, dtype=x.dtype)  # noqa: E731
    return Point(t, col(log_a.exp()), col(log_s.exp()), col(log_a - log_s))


def grid_points(schedule: Schedule, ts: torch.Tensor) -> list[Point]:
    log_a, log_s = schedule.log_alpha_sigma(ts)
    return [
        Point(t, math.exp(la), math.exp(ls), la - ls)
        for t, la, ls in zip(ts.tolist(), log_a.tolist(), log_s.tolist())
    ]


def t_batch(p: Point, x: torch.Tensor) -> torch.Tensor:
    """The [B] time tensor a denoiser is called with."""
    if isinstance(p.t, torch.Tensor):  # a per-sample point
        return p.t.to(x.device)
    # one value seen by the whole batch: an expanded (stride-0) tensor, which teachers may use to compute
    # their coefficients once per time (``teachers.diffusers_folder.DiffusersTeacher``)
    return torch.tensor(p.t, dtype=torch.float64, device=x.device).expand(x.shape[0])


def ddim_step(x: torch.Tensor, x0: torch.Tensor, cur: Point, nxt: Point) -> torch.Tensor:
    """x_next = (sigma_n / sigma) x - alpha_n (e^{-h} - 1) x0: DDIM with eta = 0 (Song et al. 2021, Eq. 12),
    which is DPM-Solver++(1) (Lu et al. 2022b, Eq. 9) in data-prediction form, h = lam_n - lam."""
    if nxt.clean:
        return x0
    h = nxt.lam - cur.lam
    if isinstance(h, torch.Tensor):  # per-sample points
        return x * (nxt.sigma / cur.sigma) - x0 * (nxt.alpha * torch.expm1(-h))
    p, q = ddim_coefficients(cur, nxt)
    return torch.add(x * p, x0, alpha=q)


def ddim_coefficients(cur: Point, nxt: Point) -> tuple[float, float]:
    """(p, q) with ``ddim_step(x, x0, cur, nxt) = p x + q x0`` between two single-time points that are not clean."""
    return nxt.sigma / cur.sigma, -(nxt.alpha * math.expm1(-(nxt.lam - cur.lam)))


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


def _horner(coeffs: list[float], x: float) -> float:
    out = 0.0
    for c in reversed(coeffs):
        out = out * x + c
    return out


def lagrange_weights(nodes, lo: float, hi: float, *, exp_weight: bool = False) -> list[float]:
    """w_j = int_lo^hi L_j(s) ds, or int_lo^hi e^-s L_j(s) ds with ``exp_weight``, where L_j is the Lagrange
    basis polynomial of node j: the weights of an Adams-Bashforth step (of an exponential-integrator one).

    Closed forms, exact up to rounding: int e^-s P(s) ds = -e^-s (P + P' + P'' + ...); computed in s - lo,
    with plain coefficient lists (lowest degree first): this runs once per step on every sampling call.
    """
    v, span = [float(s) - lo for s in nodes], hi - lo
    weights = []
    for j, vj in enumerate(v):
        basis = [1.0]
        for vk in v[:j] + v[j + 1:]:  # multiply by (s - vk) / (vj - vk)
            scale = 1.0 / (vj - vk)
            basis = [scale * (a - vk * b) for a, b in zip([0.0, *basis], [*basis, 0.0])]
        if exp_weight:
            q, deriv = list(basis), basis
            while len(deriv) > 1:
                deriv = [k * c for k, c in enumerate(deriv)][1:]
                q = [a + (deriv[k] if k < len(deriv) else 0.0) for k, a in enumerate(q)]
            weights.append(math.exp(-lo) * (q[0] - math.exp(-span) * _horner(q, span)))
        else:
            weights.append(_horner([0.0] + [c / (k + 1) for k, c in enumerate(basis)], span))
    return weights


def exp_chart(p: Point, predict: str) -> tuple[float, float, float]:
    """(k, m, ell) of the exponential integrator x_n = (k_n / k) x - m_n sum_j w_j(h) T_j with h = ell_n - ell.

    predict="noise": k, m, ell = alpha, sigma, lam and M = eps (DPM-Solver, Lu et al. 2022, Eq. 3.4);
    predict="data": k, m, ell = sigma, alpha, -lam and M = x0 (DPM-Solver++, Lu et al. 2022b). The two
    parameterizations are the same formulas with alpha <-> sigma and lam -> -lam.
    """
    if predict == "noise":
        return p.alpha, p.sigma, p.lam
    if predict == "data":
        return p.sigma, p.alpha, -p.lam
    raise ValueError(f"unknown predict {predict!r}; allowed: noise, data")


def exp_step(x: torch.Tensor, cur: Point, nxt: Point, terms: list[torch.Tensor], predict: str = "data", *,
             midpoint: bool = False) -> torch.Tensor:
    """x_n = (k_n / k) x - m_n [phi_1(h) T_0 + phi_2(h) T_1 + phi_3(h) T_2] (see ``exp_chart``): the exponential
    integrator with the model's Taylor terms in ell, T_0 = M, T_1 ~ h M', T_2 ~ h^2 M'', and
    phi_1 = e^h - 1, phi_2 = phi_1 / h - 1, phi_3 = phi_2 / h - 1/2 (Lu et al. 2022, Sec. 3, unnormalized as in
    their code). ``midpoint`` weights T_1 by phi_1(h) / 2 instead: the rule of DPM-Solver-2 (Alg. 1) and 2M."""
    k, _, ell = exp_chart(cur, predict)
    k_n, m_n, ell_n = exp_chart(nxt, predict)
    h = ell_n - ell
    per_sample = isinstance(h, torch.Tensor)
    phi_1 = torch.expm1(h) if per_sample else math.expm1(h)
    phi_2 = phi_1 / 2 if midpoint else phi_1 / h - 1
    phi_3 = (phi_1 / h - 1) / h - 0.5
    out = x * (k_n / k)
    for w, term in zip((phi_1, phi_2, phi_3), terms):
        if per_sample:
            out = out - term * (m_n * w)
        else:
            out = out.add_(term, alpha=-(m_n * w))  # one fused op; ``out`` is a fresh tensor
    return out


def multistep_terms(ds: list[torch.Tensor], lams: list[float], h: float, *, halve_d2: bool = False) -> list[torch.Tensor]:
    """Taylor terms [T_0, T_1, T_2] ~ [M, h M', h^2 M''] (see ``exp_step``) from the model values ``ds`` at the
    previous grid points ``lams`` (newest first, up to three) by backward differences, for a step of size h:
    DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) and (3M). ``halve_d2`` returns h^2 M'' / 2 for T_2, as diffusers'
    ``multistep_dpm_solver_third_order_update`` (and the DPM-Solver code) do, which costs the third order."""
    if len(ds) == 1:
        return [ds[0]]
    r0 = (lams[0] - lams[1]) / h
    d1_0 = (ds[0] - ds[1]) / r0  # h M' - r0 h^2 M'' / 2
    if len(ds) == 2:
        return [ds[0], d1_0]
    r1 = (lams[1] - lams[2]) / h
    d1_1 = (ds[1] - ds[2]) / r1  # h M' - (2 r0 + r1) h^2 M'' / 2
    d2 = (d1_0 - d1_1) / (r0 + r1)  # h^2 M'' / 2
    return [ds[0], d1_0 + r0 * d2, d2 if halve_d2 else 2 * d2]


def sde_step(x: torch.Tensor, x0: torch.Tensor, cur: Point, nxt: Point, noise: torch.Tensor | None) -> torch.Tensor:
    """x_n = (sigma_n / sigma) e^{-h} x + alpha_n (1 - e^{-2h}) x0 + sigma_n sqrt(1 - e^{-2h}) z, h = lam_n - lam:
    SDE-DPM-Solver++(1) (Lu et al. 2022b, the first-order step of diffusers' ``sde-dpmsolver++``), which is the
    DDPM ancestral step: a draw from the posterior q(x_n | x, x0) (Ho et al. 2020, Eq. 6-7, for any alpha, sigma)."""
    if nxt.clean:
        return x0
    h = nxt.lam - cur.lam
    e = -math.expm1(-2 * h)  # 1 - e^{-2h}
    return (nxt.sigma / cur.sigma * math.exp(-h)) * x + (nxt.alpha * e) * x0 + (nxt.sigma * math.sqrt(e)) * noise
