"""DPM-Solver-v3 (Zheng, Lu, Chen & Zhu, NeurIPS 2023): the exponential integrator of the ODE rewritten with
empirical model statistics (EMS) l, s, b, so that the part left to the Taylor expansion varies least.

With y = x / alpha and f = (sigma eps - l x) / alpha = (1 - l) x / alpha - D (Eq. 8), the ODE is
dy/dlam = -l y - f (lam = log(alpha / sigma)), and with g = e^{-S} f - B (S = int s, B = int e^{-S} b) it reads
x_t = alpha_t e^{L_s - L_t} [x_s / alpha_s - int_s^t e^{E(lam)} (g~(lam) + J(lam)) dlam]   (Eq. 9-10)
where E = (L + S)(lam) - (L + S)(lam_s), g~ = e^{S_s} (g + B_s) (g~_s = f_s) and J(lam) = int_s^lam e^{S_s - S} b.
The statistics (``EMS``, from ``distill.solvers.prepared.dpm_v3.ems`` / ``scripts/compute_ems.py``) are per dimension on a uniform lam grid,
linearly interpolated between its points; the integrals are taken by composite Gauss-Legendre quadrature, exact
for l = 1, s = b = 0, where the method is DPM-Solver++ (tests/test_dpm_v3.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from distill.solvers.basic import _emit
from distill.solvers.common import grid_points, multistep_order, t_batch
from distill.solvers.prepared import files as prepared
from distill.solvers.registry import register

SOLVER_TYPES = ("taylor", "midpoint")
_GL_NODES, _GL_WEIGHTS = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(6))  # on [-1, 1]


@dataclass
class EMS:
    """Empirical model statistics l, s, b [n + 1, *data_shape] (float64) on the increasing lam grid ``lams``."""

    lams: torch.Tensor
    l: torch.Tensor
    s: torch.Tensor
    b: torch.Tensor
    teacher_hash: str = ""
    meta: dict | None = None

    def __post_init__(self):
        self.lams = self.lams.double()
        n = len(self.lams)
        if n < 2 or not bool((self.lams[1:] > self.lams[:-1]).all()):
            raise ValueError("EMS need at least two strictly increasing lam points")
        for name in ("l", "s", "b"):
            v = getattr(self, name).double()
            if v.shape[0] != n:
                raise ValueError(f"EMS {name} has {v.shape[0]} rows for {n} lam points")
            setattr(self, name, v)
        self.shape = tuple(self.l.shape[1:])
        flat = [v.flatten(1) for v in (self.l, self.s)]
        dl = (self.lams[1:] - self.lams[:-1])[:, None]
        # L and S at the grid points: exact integrals of the piecewise-linear l and s (trapezoid rule)
        self._cum = [torch.cat([torch.zeros_like(v[:1]), torch.cumsum(0.5 * dl * (v[1:] + v[:-1]), 0)]) for v in flat]

    @classmethod
    def degenerate(cls, lams, data_shape) -> "EMS":
        """l = 1, s = b = 0: DPM-Solver++ (Zheng et al. 2023, Sec. 3.3)."""
        lams = torch.as_tensor(lams, dtype=torch.float64)
        ones = torch.ones(len(lams), *data_shape, dtype=torch.float64)
        return cls(lams, ones, torch.zeros_like(ones), torch.zeros_like(ones))

    # -- values at arbitrary lam --------------------------------------------------------------------
    def _locate(self, lam: torch.Tensor):
        lo, hi = float(self.lams[0]), float(self.lams[-1])
        if bool(((lam < lo - 1e-6) | (lam > hi + 1e-6)).any()):
            raise ValueError(f"the grid reaches lam = {lam.min():.4g}..{lam.max():.4g}, outside the statistics' range "
                             f"[{lo:.4g}, {hi:.4g}]; compute the EMS over the whole range of the grid")
        lam = lam.clamp(lo, hi)
        i = (torch.searchsorted(self.lams, lam, right=True) - 1).clamp(0, len(self.lams) - 2)
        return lam, i, (lam - self.lams[i]) / (self.lams[i + 1] - self.lams[i])

    def at(self, lam: torch.Tensor) -> dict[str, torch.Tensor]:
        """l, s, b, L = int l, S = int s (from the first grid point) at ``lam`` [Q]: each [Q, D] (D flattened)."""
        lam, i, w = self._locate(lam.double())
        w = w[:, None]
        out = {}
        for name in ("l", "s", "b"):
            v = getattr(self, name).flatten(1)
            out[name] = torch.lerp(v[i], v[i + 1], w)
        for name, cum, v in (("L", self._cum[0], self.l.flatten(1)), ("S", self._cum[1], self.s.flatten(1))):
            out[name] = cum[i] + 0.5 * (lam - self.lams[i])[:, None] * (v[i] + out[name.lower()])
        return out

    def quadrature(self, a: float, b: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Nodes and weights of composite Gauss-Legendre on [a, b] split at the grid points inside (signed: a > b
        gives negative weights), so each piece sees linear l, s, b."""
        lo, hi = min(a, b), max(a, b)
        inner = self.lams[(self.lams > lo) & (self.lams < hi)]
        edges = torch.cat([torch.tensor([lo], dtype=torch.float64), inner, torch.tensor([hi], dtype=torch.float64)])
        mid, half = 0.5 * (edges[1:] + edges[:-1]), 0.5 * (edges[1:] - edges[:-1])
        nodes = (mid[:, None] + half[:, None] * _GL_NODES[None]).flatten()
        weights = (half[:, None] * _GL_WEIGHTS[None]).flatten()
        return nodes, (weights if b >= a else -weights)

    # -- files --------------------------------------------------------------------------------------
    def save(self, path) -> None:
        meta = {"kind": "ems", "teacher_hash": self.teacher_hash, **{k: str(v) for k, v in (self.meta or {}).items()}}
        prepared.save_tensors(path, {"lams": self.lams, "l": self.l, "s": self.s, "b": self.b}, meta)

    @classmethod
    def load(cls, path, teacher=None) -> "EMS":
        t, meta = prepared.load_tensors(path, "ems", teacher)
        return cls(t["lams"], t["l"], t["s"], t["b"], meta.get("teacher_hash", ""), meta)


class _Step:
    """The coefficients of one step lam_s -> lam_t (all [D]): A = e^{L_s - L_t}, K_k = int e^E (lam - lam_s)^k / k!,
    the b-term int e^E J, and the rescaling of other points' f into g~ around lam_s."""

    def __init__(self, ems: EMS, lam_s: float, lam_t: float, max_k: int):
        self.ems, self.lam_s, self.h = ems, lam_s, lam_t - lam_s
        here = ems.at(torch.tensor([lam_s, lam_t], dtype=torch.float64))
        self.LS_s, self.S_s = here["L"][0] + here["S"][0], here["S"][0]
        self.A = torch.exp(here["L"][0] - here["L"][1])
        nodes, w = ems.quadrature(lam_s, lam_t)
        v = ems.at(nodes)
        e = torch.exp(v["L"] + v["S"] - self.LS_s) * w[:, None]  # weights of int e^E . dlam
        u = (nodes - lam_s)[:, None]
        self.K = [(e * u**k).sum(0) / math.factorial(k) for k in range(max_k + 1)]
        self.b_term = (e * self._b_integral_at(nodes)).sum(0) if bool(ems.b.any()) else torch.zeros_like(self.A)

    def _b_integral_at(self, nodes: torch.Tensor) -> torch.Tensor:
        """J(lam) = int_{lam_s}^{lam} e^{S_s - S} b at each node [Q, D]."""
        out = []
        for lam in nodes.tolist():
            q, w = self.ems.quadrature(self.lam_s, lam)
            v = self.ems.at(q)
            out.append((torch.exp(self.S_s - v["S"]) * v["b"] * w[:, None]).sum(0))
        return torch.stack(out)

    def rescale(self, f: torch.Tensor, lam: float) -> torch.Tensor:
        """g~(lam) = e^{S_s - S(lam)} f - J(lam) (Zheng et al. 2023, Eq. 10, relative to lam_s)."""
        if lam == self.lam_s:
            return f
        v = self.ems.at(torch.tensor([lam], dtype=torch.float64))
        scale, shift = torch.exp(self.S_s - v["S"][0]), self._b_integral_at(torch.tensor([lam], dtype=torch.float64))[0]
        return f * scale.reshape(f.shape[1:]).to(f.dtype) - shift.reshape(f.shape[1:]).to(f.dtype)

    def apply(self, x: torch.Tensor, cur, nxt, derivs: list[torch.Tensor], midpoint: bool) -> torch.Tensor:
        """x_t = alpha_t A [x_s / alpha_s - sum_k K_k g~^(k) - b-term] (Eq. 11, Taylor terms g~^(k) at lam_s)."""
        shape = x.shape[1:]
        acc = x / cur.alpha
        for k, d in enumerate(derivs):
            weight = self.h / 2 * self.K[0] if (midpoint and k == 1) else self.K[k]  # 2M's "midpoint" rule
            acc = acc - weight.reshape(shape).to(x.dtype) * d
        acc = acc - self.b_term.reshape(shape).to(x.dtype)
        return nxt.alpha * self.A.reshape(shape).to(x.dtype) * acc


def taylor_derivatives(values: list[torch.Tensor], lams: list[float], pseudo: bool) -> list[torch.Tensor]:
    """[g, g', g'', ...] at lams[0] from the values at ``lams`` (lams[0] first): the local Taylor (Vandermonde) system
    of Eq. 12, or with ``pseudo`` the Newton divided differences times k! (the paper's pseudo-order solver)."""
    n = len(values) - 1
    if n == 0:
        return [values[0]]
    du = [lam - lams[0] for lam in lams[1:]]
    if pseudo:
        table, out = list(values), [values[0]]
        for k in range(1, n + 1):
            table = [(table[i + 1] - table[i]) / (lams[i + k] - lams[i]) for i in range(len(table) - 1)]
            out.append(table[0] * math.factorial(k))
        return out
    vander = torch.tensor([[u**k / math.factorial(k) for k in range(1, n + 1)] for u in du], dtype=torch.float64)
    inv = torch.linalg.inv(vander)
    rhs = [v - values[0] for v in values[1:]]
    return [values[0]] + [sum(float(inv[k, i]) * rhs[i] for i in range(n)) for k in range(n)]


@register("dpm_solver_v3", order=4)  # the defaults: order 3 plus the corrector (tests/test_dpm_v3.py)
def dpm_solver_v3(denoiser, x, ts, *, schedule, cond=None, callback=None, ems: EMS | None = None, order: int = 3,
                  p_pseudo: bool = False, use_corrector: bool = True, c_pseudo: bool = False,
                  lower_order_final: bool = True, solver_type: str = "taylor"):
    """DPM-Solver-v3 multistep predictor (Zheng et al. 2023, Alg. 1) with the UniC-style corrector (Sec. 3.4).

    Step i uses order min(order, i + 1) (with ``lower_order_final`` also at most ``steps - i``); the Taylor terms of
    g~ come from the last points by the Vandermonde system, or by divided differences with ``p_pseudo`` (the
    predictor) / ``c_pseudo`` (the corrector). The corrector (``use_corrector``, no extra NFE) redoes each step once
    the model is known at its end, one order higher, keeping the model's N = sigma eps - l x (so f) fixed.
    ``solver_type="midpoint"`` weights the first derivative of order-2 steps by h/2 int e^E (DPM-Solver++(2M)'s
    rule). ``ems``: the statistics (``EMS`` or, through ``sample``, a file); None: the degenerate l = 1, s = b = 0.
    The step into the clean point returns the data prediction (1 NFE).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"dpm_solver_v3 order must be 1, 2 or 3, got {order!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"unknown solver_type {solver_type!r}; allowed: {', '.join(SOLVER_TYPES)}")
    pts = grid_points(schedule, ts)
    finite = [p.lam for p in pts if not p.clean]
    if not all(math.isfinite(lam) for lam in finite):
        raise ValueError("dpm_solver_v3 needs a finite log-SNR at every grid time but the clean point")
    if ems is None:
        ems = EMS.degenerate(torch.arange(min(finite) - 0.05, max(finite) + 0.1, 0.05), x.shape[1:])
    if tuple(ems.shape) != tuple(x.shape[1:]):
        raise ValueError(f"EMS of shape {list(ems.shape)} do not fit samples of shape {list(x.shape[1:])}")
    steps = len(pts) - 1
    fs, lams, last = [], [], None  # f at previous grid points (newest first); the last step's coefficients
    for i, (cur, nxt) in enumerate(zip(pts[:-1], pts[1:])):
        d = denoiser(x, t_batch(cur, x), cond)
        l_cur = ems.at(torch.tensor([cur.lam], dtype=torch.float64))["l"][0].reshape(x.shape[1:]).to(x.dtype)
        f = (1 - l_cur) * x / cur.alpha - d  # f = (sigma eps - l x) / alpha (Eq. 8)
        if use_corrector and last is not None:  # UniC-style corrector: the same step with f at its end
            step, x_prev, prev, p = last
            vals = [fs[0], step.rescale(f, cur.lam)] + [step.rescale(g, lam) for g, lam in zip(fs[1:p], lams[1:p])]
            derivs = taylor_derivatives(vals, [lams[0], cur.lam, *lams[1:p]], c_pseudo)
            x = step.apply(x_prev, prev, cur, derivs, False)
            d = (1 - l_cur) * x / cur.alpha - f  # D for the corrected x with N (so f) kept fixed
        _emit(callback, i, cur, x, d)
        fs, lams = [f, *fs][:order], [cur.lam, *lams][:order]
        if nxt.clean:
            return d
        p = multistep_order(order, i, steps, lower_order_final)
        step = _Step(ems, cur.lam, nxt.lam, p)
        vals = [fs[0]] + [step.rescale(g, lam) for g, lam in zip(fs[1:p], lams[1:p])]
        derivs = taylor_derivatives(vals, lams[:p], p_pseudo)
        last = (step, x, cur, p)
        x = step.apply(x, cur, nxt, derivs, solver_type == "midpoint" and p == 2)
    return x
