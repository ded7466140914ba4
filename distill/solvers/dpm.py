"""DPM-Solver family (Lu et al. 2022, 2022b)."""

from __future__ import annotations

from distill.solvers.basic import _emit
from distill.solvers.common import ddim_step, grid_points, t_batch
from distill.solvers.registry import register


@register("dpmpp_2m", order=2)
def dpmpp_2m(denoiser, x, ts, *, schedule, cond=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): a DDIM step taken with the data prediction
    linearly extrapolated in lam, D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, r = h_{i-1} / h_i.
    The first step is first order; the step into the clean point returns the data prediction
    (diffusers' ``final_sigmas_type="zero"``)."""
    pts = grid_points(schedule, ts)
    prev = None  # (data prediction, h) of the previous step
    for i, (cur, nxt) in enumerate(zip(pts[:-1], pts[1:])):
        d = denoiser(x, t_batch(cur, x), cond)
        _emit(callback, i, cur, x, d)
        h = nxt.lam - cur.lam
        d_ext = d
        if prev is not None and not nxt.clean:
            r = prev[1] / h
            d_ext = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * prev[0]
        x = ddim_step(x, d_ext, cur, nxt)
        prev = (d, h)
    return x
