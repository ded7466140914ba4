"""distill.core.jvp: forward-mode JVPs are exact, the central-difference fallback agrees with them, and ``auto`` falls back
where a module has no forward-mode support."""

import pytest
import torch

from distill.core.jvp import finite_difference_jvp, jvp

A = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.0, 1.5], [-1.0, 0.7, 2.0]], dtype=torch.float64)


def f(x, s):
    """f(x, s) = sin(s) A x + s^2 x^3 (per row), whose Jacobian is known in closed form."""
    return torch.sin(s)[:, None] * (x @ A.T) + (s**2)[:, None] * x**3


def f_jvp(x, s, dx, ds):
    """J_f (dx, ds) = cos(s) ds A x + sin(s) A dx + 2 s ds x^3 + 3 s^2 x^2 dx."""
    return (torch.cos(s) * ds)[:, None] * (x @ A.T) + torch.sin(s)[:, None] * (dx @ A.T) \
        + (2 * s * ds)[:, None] * x**3 + 3 * (s**2)[:, None] * x**2 * dx


class NoForwardMode(torch.autograd.Function):
    """x -> x^2 with a backward formula only: forward-mode AD raises on it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


@pytest.fixture
def point():
    g = torch.Generator().manual_seed(0)
    x, dx = (torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(2))
    s, ds = torch.rand(6, generator=g, dtype=torch.float64) * 2, torch.randn(6, generator=g, dtype=torch.float64)
    return x, s, dx, ds


def test_forward_mode_is_exact_and_the_central_difference_agrees(point):
    x, s, dx, ds = point
    exact = f_jvp(x, s, dx, ds)
    out, forward = jvp(f, (x, s), (dx, ds), method="forward")
    assert torch.equal(out, f(x, s)) and (forward - exact).abs().max() < 1e-13  # float64 round-off only
    out, fd = jvp(f, (x, s), (dx, ds), method="finite_difference")
    assert torch.equal(out, f(x, s))
    assert (fd - exact).abs().max() < 1e-8 * exact.abs().max()  # O(h^2) + O(eps / h), h ~ eps^(1/3): about 1e-10
    # the step is relative to the input scale: the same function of 1000x larger inputs stays as accurate
    big = lambda x_, s_: f(x_ / 1000, s_)  # noqa: E731
    _, fd_big = finite_difference_jvp(big, (1000 * x, s), (1000 * dx, ds))
    assert (fd_big - exact).abs().max() < 1e-8 * exact.abs().max()


def test_auto_falls_back_where_forward_mode_is_missing(point):
    x, s, dx, ds = point

    def g(x_, s_):
        return f(NoForwardMode.apply(x_), s_)

    exact = f_jvp(x * x, s, 2 * x * dx, ds)
    with pytest.raises((NotImplementedError, RuntimeError)):
        jvp(g, (x, s), (dx, ds), method="forward")
    seen = []
    with pytest.warns(UserWarning, match="forward-mode AD is not supported here"):
        out, auto = jvp(g, (x, s), (dx, ds), method="auto", on_fallback=seen.append)
    assert len(seen) == 1 and torch.equal(out, g(x, s))
    assert (auto - exact).abs().max() < 1e-8 * exact.abs().max()
    with pytest.raises(ValueError, match="unknown jvp method 'reverse'; allowed: auto, forward, finite_difference"):
        jvp(f, (x, s), (dx, ds), method="reverse")
