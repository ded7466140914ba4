"""First- and second-order baselines: Euler (DDIM) and Heun (EDM)."""

from __future__ import annotations

from distill.solvers.common import chart_scale, ddim_step, grid_points, t_batch
from distill.solvers.registry import register


def _emit(callback, i, p, x, d):
    if callback is not None:
        callback({"i": i, "t": p.t, "x": x, "denoised": d})


@register("euler", order=1)
def euler(denoiser, x, ts, *, schedule, cond=None, callback=None):
    """DDIM (eta = 0): the exponential-integrator Euler step, Euler's method in sigma for EDM."""
    pts = grid_points(schedule, ts)
    for i, (cur, nxt) in enumerate(zip(pts[:-1], pts[1:])):
        d = denoiser(x, t_batch(cur, x), cond)
        _emit(callback, i, cur, x, d)
        x = ddim_step(x, d, cur, nxt)
    return x


def _heun_nfe(steps: int, clean_final: bool) -> int:
    return 2 * steps - int(clean_final)


@register("heun", order=2, nfe=_heun_nfe, recommended=(("grid", "karras"), ("sigma_max", 80.0)))
def heun(denoiser, x, ts, *, schedule, cond=None, callback=None):
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1 with S_churn = 0).

    Heun's method on dy/dtau = (y - D) / tau with y = x / c, tau = sigma / c. EDM's chart is c = alpha
    (tau = sigma / alpha); for rectified flow, c = alpha + sigma = 1 (Heun in t on the velocity), which
    stays finite at t = 1 where alpha = 0. The step into the clean point is an Euler step (= D).
    """
    pts = grid_points(schedule, ts)
    for i, (cur, nxt) in enumerate(zip(pts[:-1], pts[1:])):
        d = denoiser(x, t_batch(cur, x), cond)
        _emit(callback, i, cur, x, d)
        if nxt.clean:
            x = d
            continue
        c, c_n = chart_scale(schedule, cur), chart_scale(schedule, nxt)
        tau, tau_n = cur.sigma / c, nxt.sigma / c_n
        y = x / c
        dy = (y - d) / tau
        y_n = y + (tau_n - tau) * dy  # Euler predictor
        d_n = denoiser(c_n * y_n, t_batch(nxt, x), cond)
        dy_n = (y_n - d_n) / tau_n
        x = c_n * (y + (tau_n - tau) * 0.5 * (dy + dy_n))  # trapezoidal corrector
    return x
