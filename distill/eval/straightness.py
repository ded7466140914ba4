"""Straightness of a model's probability-flow ODE and the exact few-step metrics of reflowed / distilled models.

Straightness (Liu et al. 2022, "Flow Straight and Fast", Def. 2.3, in process time t over [t_clean, t_max]):

    S = E int || (x_end - x_start) / (t_end - t_start) - dx_t/dt ||^2 dt / (t_max - t_clean)

the mean squared deviation of the ODE velocity from the straight line between the path's endpoints, summed over
dimensions, with dx/dt the finite difference of a fine solve (``steps`` Heun steps uniform in t, then the step onto
clean data). S = 0 exactly when every path is a straight line run at constant speed, which is when one Euler
(= DDIM on a rectified-flow schedule) step is exact.
"""

from __future__ import annotations

import torch

from distill.core.grids import make_grid
from distill.solvers import get_solver


@torch.no_grad()
def ode_path(denoiser, x_T: torch.Tensor, schedule, *, steps: int = 200, cond=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(times [steps + 2], states [B, steps + 2, ...]) of a fine Heun solve from t_max onto clean data."""
    ts = make_grid(schedule, steps, "uniform", final="clean")
    seen: dict[int, torch.Tensor] = {}
    end = get_solver("heun").fn(denoiser, x_T, ts, schedule=schedule, cond=cond,
                                callback=lambda info: seen.__setitem__(info["i"], info["x"]))
    return ts, torch.stack([seen[i] for i in range(len(ts) - 1)] + [end], 1)


def straightness(ts: torch.Tensor, states: torch.Tensor) -> float:
    """S (module doc) of paths ``states`` [B, K + 1, ...] at times ``ts`` [K + 1] (decreasing)."""
    x = states.double().flatten(2)
    dt = (ts[1:] - ts[:-1]).to(x)  # negative: time runs down
    chord = (x[:, -1] - x[:, 0]) / (ts[-1] - ts[0]).item()
    velocity = (x[:, 1:] - x[:, :-1]) / dt[None, :, None]
    dev = (velocity - chord[:, None]).pow(2).sum(-1)  # [B, K]
    return float((dev * dt.abs()[None]).sum(1).mean() / (ts[0] - ts[-1]).abs().item())
