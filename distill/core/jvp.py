"""Jacobian-vector products J_fn(primals) @ tangents, for objectives whose target holds a total derivative (MeanFlow's
d/dt u along (v, 0, 1), Geng et al. 2025, Eq. 8).

``jvp`` uses forward-mode AD (``torch.func.jvp``), with attention computed by the math kernel of
``scaled_dot_product_attention`` (the fused CPU / CUDA kernels have no forward-mode formula; the math kernel is the same
function). A module that still has no forward-mode support (a custom autograd Function, an op without a formula, a
float() inside) falls back, with ``method="auto"``, to the central difference (fn(p + h d) - fn(p - h d)) / 2h: error
O(h^2) from curvature plus O(eps / h) from rounding, balanced by h = eps^(1/3) times the input scale (Nocedal & Wright,
"Numerical Optimization", Sec. 8.1). fn must be defined at p +- h d.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Sequence

import torch

METHODS = ("auto", "forward", "finite_difference")


def _math_attention():
    """SDPA's math kernel (forward-mode differentiable) where this torch has the switch, else nothing."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # an older torch: attention as the module computes it
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def finite_difference_step(primals: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor]) -> float:
    """h = eps^(1/3) max(1, max_i |p_i|_inf) / max_i |d_i|_inf, eps of the least precise floating input: the step along
    the tangent is about eps^(1/3) of the inputs' scale (and of 1 for inputs near 0)."""
    eps = max(torch.finfo(p.dtype).eps for p in primals if p.is_floating_point())
    scale = max([1.0, *(float(p.detach().abs().max()) for p in primals if p.numel())])
    size = max([0.0, *(float(d.detach().abs().max()) for d in tangents if d.numel())])
    return eps ** (1 / 3) * scale / size if size > 0 else 1.0


def finite_difference_jvp(fn: Callable, primals: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor],
                          step: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(*primals), (fn(p + h d) - fn(p - h d)) / 2h): the central difference along the tangents (module doc)."""
    h = finite_difference_step(primals, tangents) if step is None else step
    plus = fn(*[p + h * d.to(p.dtype) for p, d in zip(primals, tangents)])
    minus = fn(*[p - h * d.to(p.dtype) for p, d in zip(primals, tangents)])
    return fn(*primals), (plus - minus) / (2 * h)


def jvp(fn: Callable, primals: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor], *, method: str = "auto",
        on_fallback: Callable[[BaseException], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(*primals), J_fn(primals) @ tangents) by forward-mode AD (``forward``), central differences
    (``finite_difference``), or forward mode falling back to central differences where fn has no forward-mode support
    (``auto``: a warning, and ``on_fallback(error)`` so a caller can skip the failing attempt next time)."""
    if method not in METHODS:
        raise ValueError(f"unknown jvp method {method!r}; allowed: {', '.join(METHODS)}")
    primals, tangents = tuple(primals), tuple(tangents)
    if len(primals) != len(tangents):
        raise ValueError(f"jvp needs one tangent per primal, got {len(primals)} primals and {len(tangents)} tangents")
    if method != "finite_difference":
        try:
            with _math_attention():
                return torch.func.jvp(fn, primals, tangents)
        except (NotImplementedError, RuntimeError) as e:
            if method == "forward":
                raise
            warnings.warn(f"forward-mode AD is not supported here ({str(e).splitlines()[0]}); using central differences",
                          stacklevel=2)
            if on_fallback is not None:
                on_fallback(e)
    return finite_difference_jvp(fn, primals, tangents)
