"""Per-time error of a one-step map f(x_t, t) against the teacher's probability-flow ODE from the same x_t.

A consistency model should map every x_t on a teacher trajectory to that trajectory's end (Song et al. 2023,
Eq. 3). For x_t = alpha(t) x0 + sigma(t) eps with x0 real data (``source="data"``) or a one-step sample of the
model itself (``source="one_step"``: the states multistep consistency sampling re-noises), this measures at each t

    err = RMS(f(x_t, t) - Phi_t(x_t)),   bias = mean(f(x_t, t) - Phi_t(x_t)),   move = RMS(Phi_t(x_t) - x0),

with Phi_t the teacher's ODE solution from t onto clean data (``reference_steps`` DPM-Solver++(2M) steps uniform in
log-SNR, or a single-Gaussian teacher's closed form). Multistep sampling can only help where err is well below the
one-step error at t_max; err above ``move`` means the model at t is worse than returning x0 itself.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from distill.core.grids import LAM_FLOOR, explicit_grid
from distill.solvers import get_solver


@torch.no_grad()
def teacher_ode_end(teacher, x: torch.Tensor, t: float, cond=None, *, steps: int = 40) -> torch.Tensor:
    """Phi_t(x): the teacher's ODE solution from time ``t`` onto clean data (closed form where the teacher has one)."""
    if hasattr(teacher, "exact_ode_solution") and len(getattr(teacher, "weights", ())) == 1:
        return teacher.exact_ode_solution(x, t, teacher.schedule.t_clean)
    sched = teacher.schedule
    # uniform in log-SNR from lam(t) itself, unlike make_grid's "logsnr", which spaces from grids.LAM_FLOOR (-7) whenever
    # lam(t) is below it (mnist16 at t = 999: -9.9); only an infinite lam(t) (a flow teacher at t = 1) starts at the floor
    lam = sched.lam(torch.tensor([float(t), float(sched.t_min)], dtype=torch.float64))
    lo = float(lam[0]) if torch.isfinite(lam[0]) else LAM_FLOOR
    times = sched.t_of_lam(torch.linspace(lo, float(lam[1]), steps, dtype=torch.float64))
    times[0] = float(t)  # exactly the state's time (t_of_lam round-trips to ~1e-12)
    grid = explicit_grid(sched, times, final="clean")
    return get_solver("dpmpp_2m").fn(teacher.denoise, x, grid, schedule=teacher.schedule, cond=cond)


@torch.no_grad()
def consistency_error(f, teacher, x0: torch.Tensor, times, *, cond=None, generator: torch.Generator | None = None,
                      reference_steps: int = 40, desc: str | None = None) -> list[dict]:
    """Rows {t, alpha, err, bias, move} (module doc) of the map ``f(x, t [B] float64, cond)`` at each of ``times``
    for the states x0 (noised with draws from ``generator``). ``desc``: the label of a tqdm bar over the times (None:
    no bar)."""
    schedule, rows = teacher.schedule, []
    for t in tqdm(times, desc=desc, unit="time", leave=False, disable=desc is None):
        tt = torch.full((x0.shape[0],), float(t), dtype=torch.float64)
        alpha, sigma = float(schedule.alpha(tt[:1])), float(schedule.sigma(tt[:1]))
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        xt = alpha * x0 + sigma * eps
        ref = teacher_ode_end(teacher, xt, float(t), cond, steps=reference_steps)
        diff = (f(xt, tt, cond) - ref).double()
        rows.append({"t": float(t), "alpha": alpha, "err": float(diff.pow(2).mean().sqrt()), "bias": float(diff.mean()),
                     "move": float((ref - x0).double().pow(2).mean().sqrt())})
    return rows
