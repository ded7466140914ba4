"""Pieces every objective family shares, written once: forward noising, the denoising (score-matching) loss,
per-sample distances, and a solver step taken per sample from its own time to its own next time."""

from __future__ import annotations

import functools
import math

import torch

from distill.core.grids import explicit_grid
from distill.core.param import append_dims, from_x0
from distill.core.schedules import Schedule

DISTANCES = ("l2", "pseudo_huber", "huber")
LOSS_SPACES = ("raw", "x0")  # the network's own parameterization, or data prediction


def alpha_sigma(schedule: Schedule, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha(t), sigma(t) for times [B] (float64 math), shaped [B, 1, ...] in ``like``'s dtype and device."""
    log_a, log_s = schedule.log_alpha_sigma(torch.as_tensor(t, dtype=torch.float64).cpu())
    return (append_dims(log_a.exp(), like.ndim).to(like), append_dims(log_s.exp(), like.ndim).to(like))


def add_noise(schedule: Schedule, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = alpha(t) x0 + sigma(t) eps (the forward process of every schedule)."""
    a, s = alpha_sigma(schedule, t, x0)
    return a * x0 + s * eps


def distance(a: torch.Tensor, b: torch.Tensor, kind: str, huber_c: float | None = None) -> torch.Tensor:
    """Per-sample distance: ``l2`` (mean of squares over dimensions), ``pseudo_huber`` sqrt(||a - b||^2 + c^2) - c over the
    whole vector with c = 0.00054 sqrt(d) by default (Song & Dhariwal 2023, Sec. 3.3), or ``huber``: the same per element,
    mean_d sqrt((a - b)^2 + c^2) - c with c = 0.001 by default (LCM's and Rectified Diffusion's ``train.py``)."""
    diff = (a - b).flatten(1)
    if kind == "l2":
        return diff.pow(2).mean(1)
    if kind == "huber":
        c = 0.001 if huber_c is None else huber_c
        return ((diff.pow(2) + c * c).sqrt() - c).mean(1)
    if kind != "pseudo_huber":
        raise ValueError(f"unknown distance {kind!r}; allowed: {', '.join(DISTANCES)}")
    c = 0.00054 * math.sqrt(diff.shape[1]) if huber_c is None else huber_c
    return (diff.pow(2).sum(1) + c * c).sqrt() - c


def denoising_loss(model, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, cond=None, *, space: str = "raw",
                   kind: str = "l2", huber_c: float | None = None, x_t: torch.Tensor | None = None, **extra) -> torch.Tensor:
    """Per-sample mean squared error of a ``NetDenoiser`` (``model``, possibly DDP-wrapped: it is called, so gradients
    synchronise) at x_t = alpha x0 + sigma eps (or the given ``x_t``): on its raw output against the target of its
    parameterization (``raw``: DDPM, Ho et al. 2020, Eq. 14, for epsilon; v for v-prediction), or on its data
    prediction (``x0``, where ``kind`` may also be ``pseudo_huber``: ``distance``)."""
    from distill.objectives.base import unwrap

    net = unwrap(model)
    x_t = add_noise(net.schedule, x0, eps, t) if x_t is None else x_t
    if space == "x0":
        return distance(model(x_t, t, cond, **extra), x0, kind, huber_c)
    if kind != "l2":
        raise ValueError(f"the raw-output loss is l2 only, got {kind!r}; use space 'x0' for {kind!r}")
    if space != "raw":
        raise ValueError(f"unknown loss space {space!r}; allowed: {', '.join(LOSS_SPACES)}")
    a, s = alpha_sigma(net.schedule, t, x0)
    target = from_x0(x0, net.prediction_type, x_t, a, s)
    return (model(x_t, t, cond, raw=True, **extra) - target).pow(2).flatten(1).mean(1)


@torch.no_grad()
def grouped_step(solver_fn, denoiser, x: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor, schedule: Schedule,
                 cond=None, extra: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """One step of ``solver_fn`` from t_from[i] to t_to[i] for every sample i, samples sharing a pair of times
    solved together on the two-point grid (a t_to at or below ``schedule.t_clean`` steps onto clean data).
    ``extra`` holds per-sample keyword inputs of the denoiser ([B] each, e.g. a guidance scale w)."""
    out = torch.empty_like(x)
    pairs = torch.stack([t_from.double().cpu(), t_to.double().cpu()], 1)
    for pair in pairs.unique(dim=0):
        m = (pairs == pair).all(1).to(x.device)
        t0, t1 = float(pair[0]), float(pair[1])
        grid = explicit_grid(schedule, [t0], final="clean") if t1 <= schedule.t_clean else \
            explicit_grid(schedule, [t0, t1], final="t_min")
        group = functools.partial(denoiser, **{k: v[m] for k, v in extra.items()}) if extra else denoiser
        out[m] = solver_fn(group, x[m], grid, schedule=schedule, cond=None if cond is None else cond[m])
    return out
