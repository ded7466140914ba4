"""The sampling entry point: teacher + noise + solver name -> samples."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from distill.core.denoisers import CountingDenoiser, classifier_free_guidance
from distill.core.grids import CLEAN_FINALS, GRIDS, explicit_grid, make_grid
from distill.core.schedules import Schedule
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


SAMPLE_OPTIONS = ("grid", "final", "teleport", "handoff_sigma", "sigma_max")  # sample()'s own, beside a solver's options


def check_options(solver: str, options, where: str = "", taken: tuple[str, ...] = ()) -> None:
    """One sentence naming the options ``solver`` does not take (``where``: e.g. ' of --variant v3') and the allowed
    ones: ``SAMPLE_OPTIONS`` and the solver's own (``SolverSpec.options``), but those in ``taken`` (set by the caller)."""
    allowed = [k for k in (*SAMPLE_OPTIONS, *get_solver(solver).options) if k not in taken]
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise ValueError(f"unknown option{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}{where} for solver "
                         f"{solver!r}; allowed: {', '.join(allowed)}")


def load_prepared(options: dict, teacher) -> dict:
    """Solver options given as file paths (``ems``, ``amed``), loaded and checked against the teacher."""
    out = dict(options)
    if isinstance(out.get("ems"), (str, Path)):
        from distill.solvers.prepared.dpm_v3.solver import EMS

        out["ems"] = EMS.load(out["ems"], teacher)
    if isinstance(out.get("amed"), (str, Path)):
        from distill.solvers.prepared.amed.predictor import AmedPredictor

        out["amed"] = AmedPredictor.load(out["amed"], teacher)
    return out


def check_prepared_files(options: dict, teacher) -> None:
    """Read every file that solver ``options`` name (``ems``, ``amed``, ``teleport``, a GITS ``grid`` file), so that a
    missing or damaged file, or one made from another teacher, is refused in one sentence before any sampling."""
    load_prepared(options, teacher)
    if isinstance(options.get("teleport"), (str, Path)):
        from distill.solvers.prepared.teleport.gaussian import GaussianFit

        GaussianFit.load(options["teleport"], teacher)
    grid = options.get("grid")
    if isinstance(grid, str) and grid not in GRIDS and grid.endswith(".json"):
        from distill.solvers.prepared import files as prepared

        prepared.load_json(grid, "gits", teacher)


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
    teleport=None,
    handoff_sigma: float | None = None,
    sigma_max: float | None = None,
    nfe_bar=None,
    **options,
):
    """Solve the probability-flow ODE from standard-normal ``noise`` and return x0.

    Give either ``nfe`` (the grid ``grid`` is built with as many steps as the solver needs to spend
    exactly that many network evaluations) or ``timesteps`` (an explicit decreasing list in the
    teacher's native units, e.g. a diffusers scheduler's ``timesteps``). ``final="clean"`` ends on
    the denoised sample after a step from t_min; ``"direct"`` ends on it straight from the last spaced time
    (no step spent below t_min, see ``distill.core.grids``); ``final="t_min"`` stops at t_min. x_T = noise * sqrt(alpha_T^2 + sigma_T^2).
    With ``return_info=True`` also returns ``{"nfe": counted, "ts": grid}``.

    ``grid`` may also be the path of a GITS grid file (``scripts/gits_search.py``), which holds one searched grid
    per step count. ``teleport`` (a ``distill.solvers.prepared.teleport.gaussian.GaussianFit`` or its file) with ``handoff_sigma`` (an EDM
    noise level sigma / alpha) jumps from t_max to that level with the closed-form Gaussian solution and spends
    the NFE on a grid from there (with ``timesteps=``, to timesteps[0]); the jump costs no NFE. Solver options
    ``ems`` and ``amed`` may be file paths: they are loaded and checked against the teacher.
    ``sigma_max`` (an EDM noise level sigma / alpha) starts the grid where the schedule reaches it, from noise of that
    scale, as EDM does (Karras et al. 2022, Sec. 3: sigma_max = 80): a VP schedule whose t_max lies at sigma / alpha
    ~ 2e4 otherwise makes the first step of a second-order method (Heun) span four orders of magnitude.
    ``nfe_bar`` (a tqdm bar, e.g. one a script opens over all its batches) is advanced by one per network evaluation.
    """
    spec = get_solver(solver)
    check_options(solver, options)
    denoiser, schedule = _model_parts(model, schedule)
    teacher = model if hasattr(model, "hash") else None
    if (nfe is None) == (timesteps is None):
        raise ValueError("give exactly one of nfe= and timesteps=")
    if guidance_scale is not None:
        denoiser = classifier_free_guidance(denoiser, guidance_scale)
    t_start = None
    if teleport is not None:
        from distill.solvers.prepared.teleport.gaussian import GaussianFit, gaussian_flow, handoff_time

        if guidance_scale is not None:
            raise ValueError("teleport has no closed form under classifier-free guidance; drop guidance_scale or teleport")
        fit = teleport if isinstance(teleport, GaussianFit) else GaussianFit.load(teleport, teacher)
        if timesteps is None:
            if handoff_sigma is None:
                raise ValueError("teleport needs handoff_sigma (the noise level sigma/alpha where the solver takes over)")
            t_start = handoff_time(schedule, handoff_sigma)
    elif handoff_sigma is not None:
        raise ValueError("handoff_sigma is an option of teleport; give teleport= too")
    if sigma_max is not None:
        from distill.solvers.prepared.teleport.gaussian import handoff_time

        if teleport is not None or timesteps is not None:
            raise ValueError("sigma_max sets where a grid starts; drop it with teleport= or timesteps=")
        try:
            t_start = handoff_time(schedule, float(sigma_max))
        except ValueError as e:
            raise ValueError(str(e).replace("handoff_sigma", "sigma_max", 1)) from None
    if timesteps is not None:
        ts = explicit_grid(schedule, timesteps, final=final)
    elif grid not in GRIDS and str(grid).endswith(".json"):
        from distill.solvers.prepared.gits.search import load_grid

        if t_start is not None:
            raise ValueError("a searched grid file fixes its own start; use teleport with timesteps= or a grid kind")
        ts = load_grid(grid, spec.steps_for_nfe(nfe, final in CLEAN_FINALS), final, teacher)
    else:
        ts = make_grid(schedule, spec.steps_for_nfe(nfe, final in CLEAN_FINALS), grid, final=final, t_max=t_start)
    options = load_prepared(options, teacher)
    counted = CountingDenoiser(denoiser, nfe_bar)
    if teleport is not None:
        x_T = noise * float(schedule.init_noise_scale(schedule.t_max))
        x_T = gaussian_flow(fit, x_T, schedule, schedule.t_max, float(ts[0]), cond)  # 0 NFE
    else:
        x_T = noise * float(schedule.init_noise_scale(ts[0]))
    x0 = spec.fn(counted, x_T, ts, schedule=schedule, cond=cond, callback=callback, **options)
    if nfe is not None and counted.nfe != nfe:
        raise RuntimeError(f"solver {solver!r} spent {counted.nfe} NFE where its registry entry promised {nfe}")
    return (x0, {"nfe": counted.nfe, "ts": ts}) if return_info else x0
