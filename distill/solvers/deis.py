"""DEIS (Zhang & Chen 2023): multistep exponential integrator on the noise prediction."""

from __future__ import annotations

import math

from distill.solvers.basic import _emit
from distill.solvers.common import ddim_step, grid_points, lagrange_weights, multistep_order, t_batch
from distill.solvers.registry import register


# order=2: the default order (diffusers' default solver_order).
@register("deis", order=2)
def deis(denoiser, x, ts, *, schedule, cond=None, callback=None, order=2, lower_order_final=True):
    """Multistep DEIS as diffusers' ``DEISMultistepScheduler`` (algorithm "deis", solver "logrho").

    x / alpha is integrated exactly in rho = sigma / alpha = e^-lam while eps is the Lagrange polynomial
    through the last ``order`` eps values in log rho (tAB-DEIS of Zhang & Chen 2023, with the Lagrange basis
    in log rho instead of t):  x_t / alpha_t = x_s / alpha_s - sum_j eps_j int_{lam_s}^{lam_t} e^-lam L_j(lam) dlam.
    Order 1 is DDIM. Warm-up and ``lower_order_final`` by ``multistep_order``: diffusers lowers the final orders
    only for solves of fewer than 15 steps, pass ``lower_order_final=False`` to match it on longer ones.
    diffusers' DEIS ends on t = 0, not on the clean point; here the step into the clean point returns the data
    prediction. Points with lam = -inf (rectified flow's t = 1) only start a first-order step.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"deis order must be 1, 2 or 3, got {order!r}")
    pts = grid_points(schedule, ts)
    steps = len(pts) - 1
    hist = []  # (Point, eps), newest first
    for i, (cur, nxt) in enumerate(zip(pts[:-1], pts[1:])):
        d = denoiser(x, t_batch(cur, x), cond)
        _emit(callback, i, cur, x, d)
        if nxt.clean:
            x = d
            continue
        hist = [(cur, (x - cur.alpha * d) / cur.sigma)] + hist[: order - 1]
        finite = sum(math.isfinite(q.lam) for q, _ in hist)
        k = max(1, min(multistep_order(order, i, steps, lower_order_final), finite))
        if k == 1:
            x = ddim_step(x, d, cur, nxt)
            continue
        w = lagrange_weights([q.lam for q, _ in hist[:k]], cur.lam, nxt.lam, exp_weight=True)
        x = nxt.alpha * (x / cur.alpha - sum(wj * eps for wj, (_, eps) in zip(w, hist)))
    return x
