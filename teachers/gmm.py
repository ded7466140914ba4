"""Analytic Gaussian-mixture teachers: exact denoiser under any schedule, exact sampling and density.

For data p(x0) = sum_k w_k N(mu_k, S_k) and x_t = alpha x0 + sigma eps, each component gives
x_t | k ~ N(alpha mu_k, alpha^2 S_k + sigma^2 I), so the ideal denoiser is the responsibility-weighted
sum of the Gaussian posterior means E[x0 | x_t, k] = mu_k + alpha S_k (alpha^2 S_k + sigma^2 I)^-1
(x_t - alpha mu_k) (e.g. Karras et al. 2022, App. B.3 for the score of a mixture). Computed in each
component's eigenbasis S_k = U_k diag(s_k) U_k^T, in float64.

Class label k restricts the mixture to component k, so every preset is also a class-conditional
teacher whose unconditional mode is the full mixture.
"""

from __future__ import annotations

import hashlib
import math

import torch

from distill.core.schedules import Schedule, get_schedule
from teachers.base import Teacher


def _rotation(deg: float) -> torch.Tensor:
    r = math.radians(deg)
    return torch.tensor([[math.cos(r), -math.sin(r)], [math.sin(r), math.cos(r)]], dtype=torch.float64)


def _cov2(var_major: float, var_minor: float, deg: float) -> torch.Tensor:
    rot = _rotation(deg)
    return rot @ torch.diag(torch.tensor([var_major, var_minor], dtype=torch.float64)) @ rot.T


def _ring8():
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = 2.0 * torch.stack([angles.cos(), angles.sin()], dim=1)
    return torch.full((8,), 1 / 8, dtype=torch.float64), means, 0.04 * torch.eye(2, dtype=torch.float64).repeat(8, 1, 1)


def _aniso2d():
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    means = torch.tensor([[-1.0, -0.5], [1.2, 0.8], [0.0, 1.5]], dtype=torch.float64)
    covs = torch.stack([_cov2(0.30, 0.02, 30.0), _cov2(0.10, 0.05, -45.0), _cov2(0.40, 0.01, 80.0)])
    return weights, means, covs


def _gauss2d():
    return torch.ones(1, dtype=torch.float64), torch.tensor([[0.5, -0.3]], dtype=torch.float64), _cov2(0.8, 0.05, 25.0)[None]


def _mix16(dim: int = 16, k: int = 6):
    g = torch.Generator().manual_seed(16)
    weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.2
    means = 1.5 * torch.randn(k, dim, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(k, dim, dim, generator=g, dtype=torch.float64))
    eig = torch.exp(torch.empty(k, dim, dtype=torch.float64).uniform_(math.log(0.02), math.log(0.3), generator=g))
    covs = q @ torch.diag_embed(eig) @ q.transpose(1, 2)
    return weights / weights.sum(), means, 0.5 * (covs + covs.transpose(1, 2))


PRESETS = {
    "ring8": _ring8,  # 8 equal isotropic modes on a circle of radius 2 (std 0.2)
    "aniso2d": _aniso2d,  # 3 modes, unequal weights (0.5, 0.3, 0.2), anisotropic rotated covariances
    "gauss2d": _gauss2d,  # one anisotropic Gaussian: its probability-flow ODE has a closed form
    "mix16": _mix16,  # 16-D, 6 modes with random means, covariances and weights (fixed seed)
}


class GaussianMixtureTeacher(Teacher):
    """A Gaussian mixture with the exact denoiser, data sampler and log-density."""

    def __init__(self, weights, means, covs, schedule: Schedule | str = "vp_linear", name: str = "gmm"):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.covs = torch.as_tensor(covs, dtype=torch.float64)
        k, dim = self.means.shape
        if self.weights.shape != (k,) or self.covs.shape != (k, dim, dim):
            raise ValueError("weights [K], means [K, D] and covs [K, D, D] must agree")
        self.eig, self.basis = torch.linalg.eigh(self.covs)  # S_k = U diag(s) U^T
        if bool((self.eig <= 0).any()):
            raise ValueError("every covariance must be positive definite")
        self.log_weights = self.weights.log() - self.weights.sum().log()
        self.schedule = get_schedule(schedule)
        self.data_shape, self.num_classes, self.has_uncond, self.name = (dim,), k, True, name
        h = hashlib.sha256()
        for tensor in (self.weights, self.means, self.covs):
            h.update(tensor.contiguous().numpy().tobytes())
        h.update(repr(sorted(self.schedule.config().items())).encode())
        self.hash = h.hexdigest()

    # -- per-component Gaussian algebra in the eigenbasis -----------------------------------------
    def _component_terms(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        """log N(x; alpha mu_k, alpha^2 S_k + sigma^2 I) [B, K] and the rotated residuals z, variances."""
        a, s = alpha[:, None, None], sigma[:, None, None]
        z = torch.einsum("bkd,kde->bke", x[:, None, :] - a * self.means[None], self.basis)
        var = a**2 * self.eig[None] + s**2
        log_n = -0.5 * ((z**2 / var) + var.log()).sum(-1) - 0.5 * x.shape[-1] * math.log(2 * math.pi)
        return log_n, z, var

    def _log_resp(self, log_n: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        logits = self.log_weights[None] + log_n
        if cond is not None:  # class k keeps component k only; -1 keeps the whole mixture
            keep = (cond[:, None] < 0) | (torch.arange(len(self.weights))[None] == cond[:, None])
            logits = logits.masked_fill(~keep, -math.inf)
        return logits

    def _denoise(self, x, t, cond):
        xd = x.double().cpu()
        alpha, sigma = self.schedule.alpha(t.cpu()), self.schedule.sigma(t.cpu())
        log_n, z, var = self._component_terms(xd, alpha, sigma)
        resp = torch.softmax(self._log_resp(log_n, None if cond is None else cond.cpu()), dim=-1)
        shrink = alpha[:, None, None] * self.eig[None] / var * z  # posterior mean offset, eigenbasis
        post = self.means[None] + torch.einsum("bke,kde->bkd", shrink, self.basis)
        return (resp[..., None] * post).sum(1).to(dtype=x.dtype, device=x.device)

    # -- exact data quantities ----------------------------------------------------------------------
    def sample_data(self, n: int, generator: torch.Generator | None = None, cond: torch.Tensor | None = None):
        """Exact samples of x0 (float64), of component ``cond[i]`` where given (-1: the mixture)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        if cond is not None:
            cond = torch.as_tensor(cond).long()
            comp = torch.where(cond >= 0, cond, comp)
        eps = torch.randn(n, self.data_shape[0], generator=generator, dtype=torch.float64)
        scaled = eps * self.eig[comp].sqrt()
        return self.means[comp] + torch.einsum("be,bde->bd", scaled, self.basis[comp])

    def log_prob(self, x0: torch.Tensor, t=None, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Exact log-density of the data (``t=None``) or of the marginal p_t at process time ``t``."""
        xd = torch.as_tensor(x0).double().cpu()
        if t is None:
            alpha, sigma = torch.ones(len(xd), dtype=torch.float64), torch.zeros(len(xd), dtype=torch.float64)
        else:
            t = torch.as_tensor(t, dtype=torch.float64).expand(len(xd))
            alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        log_n, _, _ = self._component_terms(xd, alpha, sigma)
        return torch.logsumexp(self._log_resp(log_n, cond), dim=-1)

    def exact_ode_solution(self, x: torch.Tensor, t_from, t_to) -> torch.Tensor:
        """Closed-form probability-flow ODE map x_{t_from} -> x_{t_to}, for a single Gaussian only.

        In x~ = x / alpha and sigma~ = sigma / alpha the ODE is dx~/dsigma~ = (x~ - D) / sigma~; for
        N(mu, U diag(s) U^T) each eigen-coordinate of x~ - mu scales as sqrt(s + sigma~^2).
        """
        if len(self.weights) != 1:
            raise ValueError("exact_ode_solution exists for a single Gaussian only (preset gauss2d)")
        a0, s0 = float(self.schedule.alpha(t_from)), float(self.schedule.sigma(t_from))
        a1, s1 = float(self.schedule.alpha(t_to)), float(self.schedule.sigma(t_to))
        mu, basis, eig = self.means[0], self.basis[0], self.eig[0]
        z = (x.double().cpu() / a0 - mu) @ basis
        z = z * ((eig + (s1 / a1) ** 2) / (eig + (s0 / a0) ** 2)).sqrt()
        return (a1 * (mu + z @ basis.T)).to(dtype=x.dtype, device=x.device)


def load_gmm(preset: str, schedule: Schedule | str | None = None) -> GaussianMixtureTeacher:
    """``gmm:<preset>`` teachers; ``schedule`` defaults to the continuous linear VP."""
    if preset not in PRESETS:
        raise ValueError(f"unknown gmm preset {preset!r}; allowed: {', '.join(PRESETS)}")
    weights, means, covs = PRESETS[preset]()
    return GaussianMixtureTeacher(weights, means, covs, schedule or "vp_linear", name=f"gmm:{preset}")
