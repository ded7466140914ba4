"""Noise-level sampling of the distribution-matching family: a unit draw u in [lo, hi] mapped to process times, three
ways, and the per-band view of a per-sample quantity used to log where a discriminator separates real from fake.

  uniform    t uniform in [t_min, t_max];
  karras     Karras et al. (2022, Eq. 5) rho-spacing of sigma~ = sigma/alpha between t_min (u = 0) and t_max (u = 1): a
             uniform index over a Karras grid (DMD2's diffusion GAN and DM loss; FastGen's "polynomial" sampler);
  lognormal  log sigma~ ~ N(mean, std^2) (EDM's training distribution, Karras et al. 2022, Table 1: P_mean, P_std), by
             its inverse CDF at u, clamped to the schedule's range (SiD's and Uni-Instruct's fake score: -1.2, 1.2).
"""

from __future__ import annotations

import torch

from distill.core.schedules import integer_times, sigma_tilde

TIME_SAMPLINGS = ("uniform", "karras", "lognormal")
BAND_EDGES = (0.2, 1.0, 5.0)  # sigma~ edges of the logged bands: < 0.2 | 0.2-1 | 1-5 | >= 5


def time_of_sigma_tilde(schedule, s: torch.Tensor) -> torch.Tensor:
    """The time whose sigma/alpha is ``s``: the schedule's lambda is log(alpha / sigma) = -log s (``Schedule.lam``)."""
    return schedule.t_of_lam(-s.log())


def times_of_u(schedule, u: torch.Tensor, kind: str, rho: float = 7.0, lognormal: tuple[float, float] = (-1.2, 1.2)) -> torch.Tensor:
    """u in [0, 1] -> process times by ``kind`` (module doc); integer timesteps on a discrete schedule."""
    if kind == "uniform":
        t = schedule.t_min + u * (schedule.t_max - schedule.t_min)
    elif kind == "karras":
        lo, hi = (sigma_tilde(schedule, schedule.t_min) ** (1 / rho)), (sigma_tilde(schedule, schedule.t_max) ** (1 / rho))
        t = time_of_sigma_tilde(schedule, (lo + u * (hi - lo)) ** rho).clamp(schedule.t_min, schedule.t_max)
    elif kind == "lognormal":
        lo, hi = sigma_tilde(schedule, schedule.t_min), sigma_tilde(schedule, schedule.t_max)
        mean, std = lognormal
        s = (mean + std * torch.special.ndtri(u.double().clamp(1e-12, 1 - 1e-12))).exp().clamp(float(lo), float(hi))
        t = time_of_sigma_tilde(schedule, s).clamp(schedule.t_min, schedule.t_max)
    else:
        raise ValueError(f"unknown time sampling {kind!r}; allowed: {', '.join(TIME_SAMPLINGS)}")
    return t.round() if integer_times(schedule) else t


def sample_u(n: int, g: torch.Generator, lo_hi) -> torch.Tensor:
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def band_names() -> list[str]:
    edges = [f"{e:g}" for e in BAND_EDGES]
    return [f"<{edges[0]}"] + [f"{a}-{b}" for a, b in zip(edges, edges[1:])] + [f">={edges[-1]}"]


@torch.no_grad()
def by_band(schedule, t: torch.Tensor, value: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """{prefix@band: mean of ``value`` over the samples whose sigma~(t) lies in the band (NaN where none does)}."""
    s = sigma_tilde(schedule, t.detach().cpu())
    idx = torch.bucketize(s, torch.tensor(BAND_EDGES, dtype=torch.float64), right=True)
    v = value.detach().float().flatten().cpu()
    return {f"{prefix}@{name}": v[idx == i].mean() if (idx == i).any() else torch.tensor(float("nan"))
            for i, name in enumerate(band_names())}
