"""Conversions between network parameterizations, in one place.

With x_t = alpha x0 + sigma eps, a network may predict
  * ``epsilon``: eps,
  * ``sample``: x0 (data prediction),
  * ``v_prediction``: v = alpha eps - sigma x0 (Salimans & Ho 2022, Sec. 4),
  * ``flow``: the rectified-flow velocity u = eps - x0 (Liu et al. 2022; diffusers' flow matching),
  * ``both``: x0 and eps as two halves of the channels, mixed (Salimans & Ho 2022, App.: the "both" output).
Solvers and objectives only ever see x0 (``to_x0``); students and losses go back with ``from_x0``.
``alpha`` and ``sigma`` are tensors broadcastable against ``x`` after ``append_dims``, or Python floats.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow", "both")


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so a per-sample [B] tensor broadcasts against a [B, ...] one. A Python
    number becomes a float64 tensor (``torch.as_tensor`` would round it to float32)."""
    v = v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float64)
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _check(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}")


def both_to_x0(pred: torch.Tensor, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """x0 = w x~ + (1 - w) (x - sigma eps~) / alpha with w = sigma^2 / (alpha^2 + sigma^2), (x~, eps~) the two channel
    halves of ``pred`` (Salimans & Ho 2022, the code's ``_run_model`` "both"); (1 - w) / alpha written as
    alpha / (alpha^2 + sigma^2), finite where alpha = 0."""
    a, s = append_dims(alpha, x.ndim).to(x.device, x.dtype), append_dims(sigma, x.ndim).to(x.device, x.dtype)
    x_part, eps_part = pred.chunk(2, dim=1)
    norm = a * a + s * s
    return (s * s / norm) * x_part + (a / norm) * (x - s * eps_part)


def x0_coefficients(prediction_type: str, alpha, sigma, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_x, c_p) with x0 = c_x x + c_p pred for a network output ``pred`` at state x; [B, 1, ...] float64."""
    _check(prediction_type)
    if prediction_type == "both":
        raise ValueError("prediction_type 'both' has two outputs and no single coefficient pair; use to_x0")
    a, s = append_dims(alpha, ndim), append_dims(sigma, ndim)
    if prediction_type == "sample":
        return torch.zeros_like(a), torch.ones_like(a)
    if prediction_type == "epsilon":  # x = a x0 + s eps
        return 1 / a, -s / a
    if prediction_type == "v_prediction":  # a x - s v = (a^2 + s^2) x0; the divisor is 1 for VP
        norm = a * a + s * s
        return a / norm, -s / norm
    return 1 / (a + s), -s / (a + s)  # flow: x = a x0 + s (u + x0)


def combine_x0(pred: torch.Tensor, x: torch.Tensor, c_x: torch.Tensor, c_p: torch.Tensor) -> torch.Tensor:
    """x0 = c_x x + c_p pred in one fused pass over the samples."""
    return torch.addcmul(x * c_x.to(x.device, x.dtype), pred, c_p.to(x.device, x.dtype))


def to_x0(pred: torch.Tensor, prediction_type: str, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The data prediction x0 implied by a network output ``pred`` at state ``x``."""
    if prediction_type == "sample":
        return pred
    if prediction_type == "both":
        return both_to_x0(pred, x, alpha, sigma)
    return combine_x0(pred, x, *x0_coefficients(prediction_type, alpha, sigma, x.ndim))


def from_x0(x0: torch.Tensor, prediction_type: str, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The network output of type ``prediction_type`` that corresponds to data prediction ``x0``."""
    _check(prediction_type)
    a, s = append_dims(alpha, x.ndim).to(x.device, x.dtype), append_dims(sigma, x.ndim).to(x.device, x.dtype)
    if prediction_type == "sample":
        return x0
    if prediction_type == "both":  # the pair (x0, eps) that the mixture maps back to x0
        return torch.cat([x0, (x - a * x0) / s], dim=1)
    eps = (x - a * x0) / s
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    return eps - x0


def eps_from_x0(x0: torch.Tensor, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """eps = (x - alpha x0) / sigma: the noise prediction implied by a data prediction."""
    return from_x0(x0, "epsilon", x, alpha, sigma)
