"""Time grids: decreasing float64 tensors of process times for a solver to step through.

A grid for ``steps`` solver steps has ``steps + 1`` times. With ``final="clean"`` (the default, as in
diffusers and k-diffusion) the first ``steps`` times are spaced from ``t_max`` to ``t_min`` and the
last is the schedule's ``t_clean``: the final step returns the denoised sample. With
``final="t_min"`` all ``steps + 1`` times are spaced from ``t_max`` to ``t_min`` and the sample is
returned at ``t_min``, still carrying sigma(t_min) of noise (DPM-Solver's default without
``denoise_to_zero``). With ``final="direct"`` the ``steps + 1`` times are spaced from ``t_max`` to
``t_min`` and the last is replaced by ``t_clean``: the final step goes straight to the denoised sample
and no evaluation is spent between ``t_min`` and clean (diffusers' linspace/trailing timesteps with
``final_sigmas_type="zero"``); at a few NFE this is worth one whole step.
"""

from __future__ import annotations

from typing import Sequence

import torch

from distill.core.schedules import Schedule

GRIDS = ("uniform", "logsnr", "karras", "quadratic")
FINALS = ("clean", "t_min", "direct")
CLEAN_FINALS = ("clean", "direct")  # grids whose last step returns the denoised sample
LAM_FLOOR = -7.0  # lam(t_max) = -inf (rectified flow at t = 1) is spaced from here instead


def _check_final(final: str) -> None:
    if final not in FINALS:
        raise ValueError(f"unknown final {final!r}; allowed: {', '.join(FINALS)}")


def _finite_lam(schedule: Schedule, t: float) -> torch.Tensor:
    return schedule.lam(t).clamp(min=LAM_FLOOR)


def spaced_times(schedule: Schedule, n: int, kind: str, t_max: float, t_min: float, rho: float = 7.0) -> torch.Tensor:
    """``n`` decreasing times from ``t_max`` to ``t_min`` (both included), spaced by ``kind``."""
    if n < 1:
        raise ValueError(f"a grid needs at least 1 point, got {n}")
    if n == 1:
        return torch.tensor([t_max], dtype=torch.float64)
    u = torch.linspace(0, 1, n, dtype=torch.float64)
    if kind == "uniform":  # uniform in t
        ts = t_max + u * (t_min - t_max)
    elif kind == "quadratic":  # DPM-Solver's "time_quadratic": uniform in sqrt(t)
        ts = (t_max**0.5 + u * (t_min**0.5 - t_max**0.5)) ** 2
    elif kind == "logsnr":  # uniform in lam (DPM-Solver's "logSNR" spacing)
        lo, hi = _finite_lam(schedule, t_max), schedule.lam(t_min)
        ts = schedule.t_of_lam(lo + u * (hi - lo))
    elif kind == "karras":  # Karras et al. 2022, Eq. 5, in sigma~ = sigma / alpha = exp(-lam)
        s_max, s_min = torch.exp(-_finite_lam(schedule, t_max)), torch.exp(-schedule.lam(t_min))
        s = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        ts = schedule.t_of_lam(-torch.log(s))
    else:
        raise ValueError(f"unknown grid {kind!r}; allowed: {', '.join(GRIDS)}")
    ts[0], ts[-1] = t_max, t_min  # exact end points whatever the round trip through lam
    return ts


def make_grid(
    schedule: Schedule,
    steps: int,
    kind: str = "logsnr",
    *,
    final: str = "clean",
    t_max: float | None = None,
    t_min: float | None = None,
    rho: float = 7.0,
) -> torch.Tensor:
    """The ``steps + 1`` times of a ``steps``-step solve (see the module doc for ``final``)."""
    _check_final(final)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    t_max = schedule.t_max if t_max is None else float(t_max)
    t_min = schedule.t_min if t_min is None else float(t_min)
    if not t_max > t_min:
        raise ValueError(f"t_max ({t_max}) must be greater than t_min ({t_min})")
    if final in ("t_min", "direct"):
        ts = spaced_times(schedule, steps + 1, kind, t_max, t_min, rho)
        if final == "direct":
            ts[-1] = schedule.t_clean
        return ts
    ts = spaced_times(schedule, steps, kind, t_max, t_min, rho)
    return torch.cat([ts, torch.tensor([schedule.t_clean], dtype=torch.float64)])


def explicit_grid(schedule: Schedule, timesteps: Sequence[float] | torch.Tensor, *, final: str = "clean") -> torch.Tensor:
    """A grid from times in the teacher's native units, e.g. a diffusers scheduler's integer
    ``timesteps``. With ``final="clean"`` or ``"direct"`` the clean point is appended (diffusers' last step to
    alpha = 1 / sigma = 0); with ``final="t_min"`` the list is used as given."""
    _check_final(final)
    ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten().clone()
    if ts.numel() < (1 if final == "clean" else 2):
        raise ValueError("an explicit grid needs at least one time (two with final='t_min')")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"explicit timesteps must be strictly decreasing, got {ts.tolist()}")
    if bool((ts > schedule.t_max).any()) or bool((ts <= schedule.t_clean).any()):
        raise ValueError(
            f"explicit timesteps must lie in ({schedule.t_clean}, {schedule.t_max}] for this schedule, got {ts.tolist()}"
        )
    if final in CLEAN_FINALS:
        ts = torch.cat([ts, torch.tensor([schedule.t_clean], dtype=torch.float64)])
    return ts
