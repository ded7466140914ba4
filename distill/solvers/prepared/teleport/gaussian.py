"""Gaussian teleportation (Wang & Vastola 2023, arXiv 2311.10892; TMLR, arXiv 2412.09726): at high noise the
score is close to the score of a Gaussian fitted to the data, whose probability-flow ODE has a closed form, so
the first part of sampling is one matrix multiply instead of network evaluations.

``fit_gaussian`` fits mean and covariance (per class for class-conditional teachers, plus one over all data for
label -1) in the teacher's data scaling; ``gaussian_flow`` maps x from t_from to t_to exactly for that Gaussian;
``gaussian_denoiser`` is its ideal denoiser. ``sample(..., teleport=fit, handoff_sigma=s)`` uses them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distill.core.schedules import Schedule
from distill.solvers.prepared import files as prepared


@dataclass
class GaussianFit:
    """N(mean[g], eigvecs[g] diag(eigvals[g]) eigvecs[g]^T) per group g: group k = class k, the last group = all
    data (label -1 or no label); a fit without classes has one group. Float64, flattened data dimensions."""

    mean: torch.Tensor  # [G, D]
    eigvals: torch.Tensor  # [G, D], clipped at 0
    eigvecs: torch.Tensor  # [G, D, D], columns are eigenvectors
    data_shape: tuple[int, ...]
    num_classes: int = 0
    teacher_hash: str = ""

    def groups(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor:
        """The group of each sample: its class, or the last group (all data) for -1 / no label."""
        last = self.mean.shape[0] - 1
        if cond is None or self.num_classes == 0:
            return torch.full((batch,), last, dtype=torch.long)
        cond = cond.long().cpu()
        return torch.where(cond < 0, torch.full_like(cond, last), cond)

    def save(self, path) -> None:
        prepared.save_tensors(path, {"mean": self.mean, "eigvals": self.eigvals, "eigvecs": self.eigvecs},
                              {"kind": "gaussian", "teacher_hash": self.teacher_hash, "num_classes": self.num_classes,
                               "data_shape": ",".join(map(str, self.data_shape))})

    @classmethod
    def load(cls, path, teacher=None) -> "GaussianFit":
        t, meta = prepared.load_tensors(path, "gaussian", teacher)
        shape = tuple(int(v) for v in meta["data_shape"].split(","))
        return cls(t["mean"], t["eigvals"], t["eigvecs"], shape, int(meta["num_classes"]), meta["teacher_hash"])


def _fit_one(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean = x.mean(0)
    cov = torch.cov((x - mean).T, correction=1).reshape(x.shape[1], x.shape[1])
    eigvals, eigvecs = torch.linalg.eigh(0.5 * (cov + cov.T))
    return mean, eigvals.clamp(min=0.0), eigvecs  # Sec. 10.1 of ALGORITHMS.md: clip lambda_k >= 0


def fit_gaussian(x0: torch.Tensor, labels: torch.Tensor | None = None, num_classes: int = 0,
                 teacher_hash: str = "") -> GaussianFit:
    """Mean and full covariance of data ``x0`` [N, ...] in the teacher's scaling (e.g. [-1, 1] images), one per
    class 0..num_classes-1 (from ``labels``) and one over all of ``x0``."""
    x = x0.double().flatten(1)
    if num_classes and (labels is None or labels.shape != (len(x),)):
        raise ValueError(f"a per-class fit needs labels of shape [{len(x)}], got "
                         f"{None if labels is None else list(labels.shape)}")
    parts = [x[labels == k] for k in range(num_classes)] + [x]
    if min(len(p) for p in parts) < 2:
        raise ValueError("every class needs at least 2 samples for a covariance")
    mean, eigvals, eigvecs = map(torch.stack, zip(*(_fit_one(p) for p in parts)))
    return GaussianFit(mean, eigvals, eigvecs, tuple(x0.shape[1:]), num_classes, teacher_hash)


def _coefficients(schedule: Schedule, t) -> tuple[float, float]:
    log_a, log_s = schedule.log_alpha_sigma(torch.tensor(float(t), dtype=torch.float64))
    return math.exp(float(log_a)), math.exp(float(log_s))


def gaussian_flow(fit: GaussianFit, x: torch.Tensor, schedule: Schedule, t_from, t_to, cond=None) -> torch.Tensor:
    """The exact probability-flow ODE map x_{t_from} -> x_{t_to} when the data are N(mu, U diag(lam) U^T):
    x_t = a_t mu + sum_k sqrt((s_t^2 + a_t^2 lam_k) / (s_T^2 + a_T^2 lam_k)) u_k u_k^T (x_T - a_T mu)
    (Wang & Vastola 2023, Eq. 9 in VP form; with a = 1 the EDM/VE form; a full eigenbasis, so the complement has
    lam = 0). Any schedule, including rectified flow at t = 1 (a_T = 0)."""
    a0, s0 = _coefficients(schedule, t_from)
    a1, s1 = _coefficients(schedule, t_to)
    g = fit.groups(cond, x.shape[0])
    mu, lam, basis = fit.mean[g], fit.eigvals[g], fit.eigvecs[g]
    scale = ((s1**2 + a1**2 * lam) / (s0**2 + a0**2 * lam)).sqrt()
    z = torch.einsum("bd,bde->be", x.double().cpu().flatten(1) - a0 * mu, basis) * scale
    out = a1 * mu + torch.einsum("be,bde->bd", z, basis)
    return out.reshape(x.shape).to(dtype=x.dtype, device=x.device)


def gaussian_denoiser(fit: GaussianFit, schedule: Schedule):
    """D(x, t, cond) = mu + U diag(a lam / (a^2 lam + s^2)) U^T (x - a mu): the ideal denoiser of the fit."""

    def denoise(x, t, cond=None):
        log_a, log_s = schedule.log_alpha_sigma(t.cpu())
        a, s = log_a.exp()[:, None], log_s.exp()[:, None]
        g = fit.groups(cond, x.shape[0])
        mu, lam, basis = fit.mean[g], fit.eigvals[g], fit.eigvecs[g]
        z = torch.einsum("bd,bde->be", x.double().cpu().flatten(1) - a * mu, basis) * (a * lam / (a**2 * lam + s**2))
        return (mu + torch.einsum("be,bde->bd", z, basis)).reshape(x.shape).to(dtype=x.dtype, device=x.device)

    return denoise


def handoff_time(schedule: Schedule, handoff_sigma: float) -> float:
    """The process time whose EDM noise level sigma / alpha = e^{-lam} is ``handoff_sigma``."""
    if not handoff_sigma > 0:
        raise ValueError(f"handoff_sigma must be a positive noise level sigma/alpha, got {handoff_sigma!r}")
    t = float(schedule.t_of_lam(torch.tensor(-math.log(handoff_sigma), dtype=torch.float64)))
    if not schedule.t_min < t < schedule.t_max:
        lo, hi = (float(torch.exp(-schedule.lam(v))) for v in (schedule.t_min, schedule.t_max))
        raise ValueError(f"handoff_sigma {handoff_sigma} lies outside this schedule's noise levels ({lo:.4g}, {hi:.4g})")
    return t
