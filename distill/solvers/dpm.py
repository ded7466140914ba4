"""DPM-Solver family (Lu et al. 2022, 2022b): single-step DPM-Solver-2/3 and DPM-Solver++(2S), multistep
DPM-Solver++(2M)/(3M).

Every step into the clean point returns the data prediction (first order, as diffusers with
``final_sigmas_type="zero"``) and costs one evaluation.
"""

from __future__ import annotations

from typing import Sequence

import torch

from distill.core.param import eps_from_x0
from distill.solvers.basic import _emit
from distill.solvers.common import Point, ddim_step, exp_step, grid_points, multistep_order, multistep_terms, t_batch
from distill.solvers.registry import register

PREDICTS = ("noise", "data")
STAGE2 = ("paper", "midpoint")


# ------------------------------------------------------------------------------------------------
# Single-step: DPM-Solver-2, DPM-Solver-3 (Lu et al. 2022, Alg. 1-2), DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1)
# ------------------------------------------------------------------------------------------------
def _model(denoiser, x, p: Point, cond, predict: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(data prediction, model value M in the solver's parameterization) at (x, p)."""
    d = denoiser(x, t_batch(p, x), cond)
    return d, (d if predict == "data" else eps_from_x0(d, x, p.alpha, p.sigma))


def _lam_fraction_points(schedule, pts: list[Point], rs: Sequence[float]) -> list[list[Point]]:
    """Per step, the points at lam_i + r h_i for r in ``rs`` (none for a step into the clean point)."""
    lams = [cur.lam + r * (nxt.lam - cur.lam) for cur, nxt in zip(pts[:-1], pts[1:]) if not nxt.clean for r in rs]
    inner = iter(grid_points(schedule, schedule.t_of_lam(torch.tensor(lams, dtype=torch.float64))) if lams else [])
    return [[] if nxt.clean else [next(inner) for _ in rs] for nxt in pts[1:]]


def _explicit_points(schedule, pts: list[Point], mid_ts, order: int) -> list[list[Point]]:
    """``mid_ts`` checked and turned into points: per step, up to order - 1 times strictly inside it."""
    if len(mid_ts) != len(pts) - 1:
        raise ValueError(f"mid_ts needs one list per step ({len(pts) - 1}), got {len(mid_ts)}")
    out = []
    for i, (cur, nxt, mids) in enumerate(zip(pts[:-1], pts[1:], mid_ts)):
        mids = [float(t) for t in mids]
        inside = all(a > b for a, b in zip([cur.t, *mids], [*mids, nxt.t]))
        if len(mids) > order - 1 or not inside or (mids and nxt.clean):
            raise ValueError(
                f"mid_ts[{i}] = {mids} must hold at most {order - 1} decreasing times strictly between {cur.t} and {nxt.t}"
                + (" (the step into the clean point takes none)" if nxt.clean else "")
            )
        out.append(grid_points(schedule, torch.tensor(mids, dtype=torch.float64)) if mids else [])
    return out


def _singlestep_update(denoiser, x, d, m, cur: Point, nxt: Point, mids: list[Point], cond, predict: str, stage2: str):
    """One single-step DPM-Solver update from (x, model value m) at ``cur`` through the intermediate points
    ``mids`` (0, 1 or 2 of them: order 1, 2 or 3), in the noise (DPM-Solver) or data (DPM-Solver++) form."""
    if nxt.clean:
        return d
    if not mids:
        return ddim_step(x, d, cur, nxt)  # DPM-Solver-1 = DPM-Solver++(1) = DDIM
    s1, h = mids[0], nxt.lam - cur.lam
    u1 = ddim_step(x, d, cur, s1)  # u = DPM-Solver-1 step to s_1 (Alg. 1-2, first line)
    m1 = _model(denoiser, u1, s1, cond, predict)[1]
    if len(mids) == 1:  # DPM-Solver-2 (Alg. 1) / DPM-Solver++(2S) (Alg. 1 of 2022b) with r1 = (lam_s1 - lam) / h
        return exp_step(x, cur, nxt, [m, (m1 - m) / ((s1.lam - cur.lam) / h)], predict, midpoint=True)
    # DPM-Solver-3 (Alg. 2): u2 by a second-order step to s2 through s1, then x_n from (m, m2) with weight phi_2 / r2
    s2 = mids[1]
    r1_in_s2 = (s1.lam - cur.lam) / (s2.lam - cur.lam)  # r1 / r2
    u2 = exp_step(x, cur, s2, [m, (m1 - m) / r1_in_s2], predict, midpoint=stage2 == "midpoint")
    m2 = _model(denoiser, u2, s2, cond, predict)[1]
    return exp_step(x, cur, nxt, [m, (m2 - m) / ((s2.lam - cur.lam) / h)], predict)


def _singlestep(denoiser, x, ts, *, schedule, cond, callback, order, rs, predict, mid_ts, stage2):
    if predict not in PREDICTS:
        raise ValueError(f"unknown predict {predict!r}; allowed: {', '.join(PREDICTS)}")
    if stage2 not in STAGE2:
        raise ValueError(f"unknown stage2 {stage2!r}; allowed: {', '.join(STAGE2)}")
    pts = grid_points(schedule, ts)
    if pts[0].lam == float("-inf"):
        raise ValueError(f"single-step DPM-Solver needs a finite log-SNR where it starts; t = {pts[0].t} has alpha = 0 "
                         "(rectified flow at t = 1): start the grid below it (timesteps=...)")
    if mid_ts is None:
        inner = _lam_fraction_points(schedule, pts, rs)
    else:
        inner = _explicit_points(schedule, pts, mid_ts, order)
    for i, (cur, nxt, mids) in enumerate(zip(pts[:-1], pts[1:], inner)):
        d, m = _model(denoiser, x, cur, cond, predict)
        _emit(callback, i, cur, x, d)
        x = _singlestep_update(denoiser, x, d, m, cur, nxt, mids, cond, predict, stage2)
    return x


def _nfe_2(steps: int, clean_final: bool) -> int:
    return 2 * steps - int(clean_final)


def _nfe_3(steps: int, clean_final: bool) -> int:
    return 3 * steps - 2 * int(clean_final)


@register("dpm_solver_2", order=2, nfe=_nfe_2, recommended=(("grid", "karras"), ("sigma_max", 80.0)))
def dpm_solver_2(denoiser, x, ts, *, schedule, cond=None, callback=None, predict: str = "noise",
                 mid_ts: Sequence[Sequence[float]] | None = None):
    """DPM-Solver-2 (Lu et al. 2022, Alg. 1, r1 = 1/2): per step, one DPM-Solver-1 (DDIM) step to the lam
    midpoint s, then x_n = (k_n/k) x - m_n phi_1(h) [M + (M(u, s) - M) / (2 r1)] (see ``common.exp_step``).

    2 NFE per step; the step into the clean point costs 1 (it returns D). Options: ``predict`` "noise" (the
    paper's eps form) or "data" (= DPM-Solver++(2S)); ``mid_ts`` an explicit intermediate time per step (a list
    of at most one time strictly inside each step; an empty list makes that step first order) instead of the
    lam midpoint, e.g. diffusers' DPMSolverSinglestepScheduler, which uses its listed timesteps.
    """
    return _singlestep(denoiser, x, ts, schedule=schedule, cond=cond, callback=callback, order=2, rs=(0.5,),
                       predict=predict, mid_ts=mid_ts, stage2="paper")


@register("dpm_solver_3", order=3, nfe=_nfe_3, recommended=(("grid", "karras"), ("sigma_max", 80.0)))
def dpm_solver_3(denoiser, x, ts, *, schedule, cond=None, callback=None, predict: str = "noise",
                 mid_ts: Sequence[Sequence[float]] | None = None, stage2: str = "paper"):
    """DPM-Solver-3 (Lu et al. 2022, Alg. 2, r1 = 1/3, r2 = 2/3 in lam): u1 by DPM-Solver-1 to s1; u2 by a
    second-order step to s2 through s1 with weight (r2/r1) phi_2(r2 h); x_n from (M, M(u2, s2)) with weight phi_2(h)/r2.

    3 NFE per step; the step into the clean point costs 1. Options: ``predict`` "noise" | "data" (DPM-Solver++
    single-step 3rd order); ``mid_ts`` explicit intermediate times (up to two per step; fewer lower that step's
    order); ``stage2="midpoint"`` computes u2 with weight (r2/r1) phi_1(r2 h)/2, as diffusers'
    DPMSolverSinglestepScheduler(solver_type="midpoint") does (its order-2 update), instead of the paper's phi_2.
    """
    return _singlestep(denoiser, x, ts, schedule=schedule, cond=cond, callback=callback, order=3, rs=(1 / 3, 2 / 3),
                       predict=predict, mid_ts=mid_ts, stage2=stage2)


@register("dpmpp_2s", order=2, nfe=_nfe_2)
def dpmpp_2s(denoiser, x, ts, *, schedule, cond=None, callback=None, mid_ts: Sequence[Sequence[float]] | None = None):
    """DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1, r = 1/2): u = DDIM to the lam midpoint s, then a DDIM step
    from x with D = (1 - 1/(2r)) x0 + 1/(2r) x0(u, s). It is ``dpm_solver_2`` in data-prediction form."""
    return dpm_solver_2(denoiser, x, ts, schedule=schedule, cond=cond, callback=callback, predict="data", mid_ts=mid_ts)


# ------------------------------------------------------------------------------------------------
# Multistep: DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) and (3M)
# ------------------------------------------------------------------------------------------------
def _dpmpp_multistep(denoiser, x, ts, *, schedule, cond, callback, max_order: int, lower_order_final: bool,
                     halve_d2: bool = False):
    pts = grid_points(schedule, ts)
    steps = len(pts) - 1
    ds, lams = [], []  # data predictions and lam at the previous grid points, newest first
    for i, (cur, nxt) in enumerate(zip(pts[:-1], pts[1:])):
        d = denoiser(x, t_batch(cur, x), cond)
        _emit(callback, i, cur, x, d)
        ds, lams = [d, *ds][:max_order], [cur.lam, *lams][:max_order]
        # warm-up 1, 2, ...; diffusers lowers the last steps' order only for solves under 15 steps
        order = multistep_order(max_order, i, steps, lower_order_final and steps < 15)
        if nxt.clean:
            x = d
            continue
        terms = multistep_terms(ds[:order], lams[:order], nxt.lam - cur.lam, halve_d2=halve_d2)
        x = exp_step(x, cur, nxt, terms, "data", midpoint=order == 2)  # 2M: phi_1/2 on T_1 (diffusers "midpoint")
    return x


@register("dpmpp_2m", order=2)
def dpmpp_2m(denoiser, x, ts, *, schedule, cond=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2): a DDIM step taken with the data prediction
    linearly extrapolated in lam, D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, r = h_{i-1} / h_i.
    The first step is first order; the step into the clean point returns the data prediction
    (diffusers' ``final_sigmas_type="zero"``)."""
    return _dpmpp_multistep(denoiser, x, ts, schedule=schedule, cond=cond, callback=callback, max_order=2,
                            lower_order_final=False)


@register("dpmpp_3m", order=3)
def dpmpp_3m(denoiser, x, ts, *, schedule, cond=None, callback=None, lower_order_final: bool = True, halve_d2: bool = False):
    """DPM-Solver++(3M): the exponential integrator (``common.exp_step``) with the data prediction's Taylor terms
    up to h^2 x0'' from backward differences over the last three grid points (the third-order multistep of the
    DPM-Solver++ code, Lu et al. 2022b). Warm-up: step 1 is first order, step 2 is DPM-Solver++(2M).

    ``lower_order_final`` (diffusers' default): with fewer than 15 steps the last step is first order and the
    second-to-last at most second order. The step into the clean point always returns the data prediction.
    ``halve_d2=True`` reproduces diffusers' ``multistep_dpm_solver_third_order_update`` (also the DPM-Solver code
    and k-diffusion): it weights the second backward difference by half its Taylor coefficient, so the local
    error keeps an h^3 x0'' / 12 term and the method converges with order 2 only (tests/test_dpm_family.py).
    """
    return _dpmpp_multistep(denoiser, x, ts, schedule=schedule, cond=cond, callback=callback, max_order=3,
                            lower_order_final=lower_order_final, halve_d2=halve_d2)
