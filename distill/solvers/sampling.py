"""The sampling entry point: teacher + noise + solver name -> samples."""

from __future__ import annotations

from typing import Sequence

import torch

from distill.denoisers import CountingDenoiser, classifier_free_guidance
from distill.grids import CLEAN_FINALS, explicit_grid, make_grid
from distill.schedules import Schedule
from distill.solvers.registry import get_solver


def per_sample_noises(shape, seeds, steps: int = 0, dtype=torch.float32) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Initial noise and the fresh noise of ``steps`` stochastic steps (a stochastic solver's ``noises=``), sample
    i's all drawn in turn from its own generator seeded with seeds[i] (EDM's StackedRandomGenerator), so a
    sample does not depend on the batch it is drawn in."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    draws = [torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in gens]) for _ in range(steps + 1)]
    return draws[0], draws[1:]


def per_sample_noise(shape, seeds, dtype=torch.float32) -> torch.Tensor:
    """The initial noise of ``per_sample_noises``: sample i's from the generator seeded with seeds[i]."""
    return per_sample_noises(shape, seeds, 0, dtype)[0]


def _model_parts(model, schedule):
    """(denoiser, schedule) from a teacher-like object or a bare denoiser plus ``schedule=``."""
    if hasattr(model, "denoise") and hasattr(model, "schedule"):
        return model.denoise, schedule or model.schedule
    if callable(model) and isinstance(schedule, Schedule):
        return model, schedule
    raise TypeError("model must be a teacher (with .denoise and .schedule) or a denoiser callable with schedule=")


def sample(
    model,
    noise: torch.Tensor,
    *,
    solver: str,
    nfe: int | None = None,
    timesteps: Sequence[float] | torch.Tensor | None = None,
    grid: str = "logsnr",
    final: str = "clean",
    cond: torch.Tensor | None = None,
    guidance_scale: float | None = None,
    schedule: Schedule | None = None,
    callback=None,
    return_info: bool = False,
    **options,
):
    """Solve the probability-flow ODE from standard-normal ``noise`` and return x0.

    Give either ``nfe`` (the grid ``grid`` is built with as many steps as the solver needs to spend
    exactly that many network evaluations) or ``timesteps`` (an explicit decreasing list in the
    teacher's native units, e.g. a diffusers scheduler's ``timesteps``). ``final="clean"`` ends on
    the denoised sample after a step from t_min; ``"direct"`` ends on it straight from the last spaced time
    (no step spent below t_min, see ``distill.grids``); ``final="t_min"`` stops at t_min. x_T = noise * sqrt(alpha_T^2 + sigma_T^2).
    With ``return_info=True`` also returns ``{"nfe": counted, "ts": grid}``.
    """
    spec = get_solver(solver)
    denoiser, schedule = _model_parts(model, schedule)
    if (nfe is None) == (timesteps is None):
        raise ValueError("give exactly one of nfe= and timesteps=")
    if guidance_scale is not None:
        denoiser = classifier_free_guidance(denoiser, guidance_scale)
    if timesteps is not None:
        ts = explicit_grid(schedule, timesteps, final=final)
    else:
        ts = make_grid(schedule, spec.steps_for_nfe(nfe, final in CLEAN_FINALS), grid, final=final)
    counted = CountingDenoiser(denoiser)
    x_T = noise * float(schedule.init_noise_scale(ts[0]))
    x0 = spec.fn(counted, x_T, ts, schedule=schedule, cond=cond, callback=callback, **options)
    if nfe is not None and counted.nfe != nfe:
        raise RuntimeError(f"solver {solver!r} spent {counted.nfe} NFE where its registry entry promised {nfe}")
    return (x0, {"nfe": counted.nfe, "ts": ts}) if return_info else x0
