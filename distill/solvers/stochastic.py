"""Stochastic references: DDPM ancestral sampling and SDE-DPM-Solver++(2M).

Both take their fresh noise from ``noises`` (one standard-normal tensor per step, the shape of x; the step
into the clean point ignores its entry) or else draw it, one tensor per noisy step and in step order, with
``torch.randn(x.shape, generator=generator)`` in x's dtype: the draws diffusers makes with the same generator.
"""

from __future__ import annotations

from typing import Sequence

import torch

from distill.solvers.basic import _emit
from distill.solvers.common import Point, grid_points, multistep_terms, sde_step, t_batch
from distill.solvers.registry import register


def _noise_fn(x: torch.Tensor, steps: int, generator: torch.Generator | None, noises: Sequence[torch.Tensor] | None):
    """i -> the standard-normal tensor of step i."""
    if noises is None:
        return lambda i: torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if generator is not None:
        raise ValueError("give at most one of generator= and noises=")
    if len(noises) != steps or any(tuple(z.shape) != tuple(x.shape) for z in noises):
        raise ValueError(f"noises needs {steps} tensors (one per step) of shape {list(x.shape)}")
    return lambda i: noises[i].to(dtype=x.dtype, device=x.device)


def _sde_solve(denoiser, x, ts, *, schedule, cond, callback, max_order: int, generator, noises):
    pts: list[Point] = grid_points(schedule, ts)
    noise = _noise_fn(x, len(pts) - 1, generator, noises)
    ds, lams = [], []  # data predictions and lam at the previous grid points, newest first
    for i, (cur, nxt) in enumerate(zip(pts[:-1], pts[1:])):
        d = denoiser(x, t_batch(cur, x), cond)
        _emit(callback, i, cur, x, d)
        ds, lams = [d, *ds][:max_order], [cur.lam, *lams][:max_order]
        if nxt.clean:
            x = d
            continue
        order = min(max_order, i + 1)  # warm-up: the first step is first order
        terms = multistep_terms(ds[:order], lams[:order], nxt.lam - cur.lam)
        d_ext = terms[0] if len(terms) == 1 else terms[0] + 0.5 * terms[1]  # diffusers' "midpoint": T_0 + T_1 / 2
        x = sde_step(x, d_ext, cur, nxt, noise(i))
    return x


@register("ddpm", order=1, stochastic=True)
def ddpm(denoiser, x, ts, *, schedule, cond=None, callback=None, generator: torch.Generator | None = None,
         noises: Sequence[torch.Tensor] | None = None):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2 over the grid): x_n ~ q(x_n | x, x0 = D(x)), the Gaussian
    posterior of Eq. 6-7 with the "fixed_small" variance sigma_n^2 (1 - e^{-2h}), as diffusers' DDPMScheduler
    (with skipped steps, its ``previous_timestep``). The same step is SDE-DPM-Solver++(1) (``common.sde_step``).
    One NFE per step; the step into the clean point returns D without noise."""
    return _sde_solve(denoiser, x, ts, schedule=schedule, cond=cond, callback=callback, max_order=1,
                      generator=generator, noises=noises)


@register("dpmpp_2m_sde", order=1, stochastic=True)
def dpmpp_2m_sde(denoiser, x, ts, *, schedule, cond=None, callback=None, generator: torch.Generator | None = None,
                 noises: Sequence[torch.Tensor] | None = None):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b; diffusers' ``algorithm_type="sde-dpmsolver++"``, solver_order=2,
    solver_type="midpoint"): the ``sde_step`` taken with the 2M extrapolation D = T_0 + T_1 / 2 of the data
    prediction. The first step is first order; the step into the clean point returns D. Registered with order 1:
    a stochastic method converges in distribution, and its strong order is not the ODE order."""
    return _sde_solve(denoiser, x, ts, schedule=schedule, cond=cond, callback=callback, max_order=2,
                      generator=generator, noises=noises)
