"""iPNDM (Zhang & Chen 2023): Adams-Bashforth on the probability-flow ODE in EDM's chart."""

from __future__ import annotations

from distill.solvers.basic import _emit
from distill.solvers.common import chart_scale, grid_points, lagrange_weights, t_batch
from distill.solvers.registry import register

# Adams-Bashforth weights for equal steps, newest first: 1; (3, -1)/2; (23, -16, 5)/12; (55, -59, 37, -9)/24.
AB_EQUAL_STEPS = {k: lagrange_weights(range(0, -k, -1), 0.0, 1.0) for k in range(1, 5)}


# order=2: with the default fixed weights, the order measured on smooth non-uniform grids (logsnr, karras).
@register("ipndm", order=2)
def ipndm(denoiser, x, ts, *, schedule, cond=None, callback=None, order=4, variable_step=False):
    """iPNDM (Zhang & Chen 2023, the DEIS paper; k-diffusion's ``sample_ipndm``): Adams-Bashforth of order
    min(order, i + 1) on dy/dtau = (y - D) / tau, y = x / c, tau = sigma / c (the charts of ``chart_scale``).

    The default takes iPNDM's fixed equal-step weights whatever the grid: order ``order`` on grids uniform in
    tau, but only order 2 on grids whose tau-steps vary (logsnr, karras), where the weights are second-order
    consistent only. ``variable_step=True`` takes the exact Adams-Bashforth weights of the actual tau grid
    (k-diffusion's ``sample_lms``, the iPNDM-v idea): order ``order`` on any smooth grid, though at 10-20 NFE
    it is less accurate than the fixed weights. The step into the clean point returns the data prediction.
    """
    if order not in (1, 2, 3, 4):
        raise ValueError(f"ipndm order must be 1, 2, 3 or 4, got {order!r}")
    pts = grid_points(schedule, ts)
    hist = []  # (tau, dy/dtau), newest first
    for i, (cur, nxt) in enumerate(zip(pts[:-1], pts[1:])):
        d = denoiser(x, t_batch(cur, x), cond)
        _emit(callback, i, cur, x, d)
        if nxt.clean:
            x = d
            continue
        c, c_n = chart_scale(schedule, cur), chart_scale(schedule, nxt)
        tau, tau_n = cur.sigma / c, nxt.sigma / c_n
        hist = [(tau, (x / c - d) / tau)] + hist[: order - 1]
        if variable_step:
            w = lagrange_weights([s for s, _ in hist], tau, tau_n)
        else:
            w = [(tau_n - tau) * a for a in AB_EQUAL_STEPS[len(hist)]]
        x = c_n * (x / c + sum(wj * dy for wj, (_, dy) in zip(w, hist)))
    return x
