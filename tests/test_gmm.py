"""The analytic teacher against independent identities: Tweedie, Gaussian algebra, moments, normalisation."""

import pytest
import torch

from distill.eval.exact import ode_reference, rmse
from teachers import GaussianMixtureTeacher, load_teacher


@pytest.mark.parametrize("spec", ["gmm:ring8", "gmm:aniso2d", "gmm:mix16", "gmm:aniso2d@edm", "gmm:ring8@rectified_flow"])
def test_denoiser_satisfies_tweedie(spec):
    # Tweedie / Robbins: E[x0 | x_t] = (x_t + sigma^2 grad log p_t(x_t)) / alpha, with grad from the exact density
    teacher = load_teacher(spec)
    s = teacher.schedule
    g = torch.Generator().manual_seed(0)
    x = 1.5 * torch.randn(64, teacher.data_shape[0], generator=g, dtype=torch.float64)
    for t in (s.t_min * 5, 0.5 * (s.t_min + s.t_max), s.t_max * 0.9):
        xr = x.clone().requires_grad_(True)
        (score,) = torch.autograd.grad(teacher.log_prob(xr, t).sum(), xr)
        a, sig = float(s.alpha(t)), float(s.sigma(t))
        assert torch.allclose(teacher.denoise(x, t), (x + sig**2 * score) / a, atol=1e-9, rtol=1e-9)


def test_single_gaussian_denoiser_is_the_posterior_mean():
    teacher = load_teacher("gmm:gauss2d")
    mu, cov = teacher.means[0], teacher.covs[0]
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = 0.4
    a, s = float(teacher.schedule.alpha(t)), float(teacher.schedule.sigma(t))
    gain = a * cov @ torch.linalg.inv(a**2 * cov + s**2 * torch.eye(2, dtype=torch.float64))
    assert torch.allclose(teacher.denoise(x, t), mu + (x - a * mu) @ gain.T, atol=1e-12)


def test_class_label_selects_its_component():
    mix = load_teacher("gmm:aniso2d")
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    one = GaussianMixtureTeacher(torch.ones(1), mix.means[1:2], mix.covs[1:2])
    assert torch.allclose(mix.denoise(x, 0.3, torch.ones(8, dtype=torch.long)), one.denoise(x, 0.3), atol=1e-12)
    assert torch.allclose(mix.denoise(x, 0.3, torch.full((8,), -1)), mix.denoise(x, 0.3), atol=0)


def test_exact_samples_have_the_mixture_moments():
    teacher = load_teacher("gmm:aniso2d")
    x = teacher.sample_data(200_000, generator=torch.Generator().manual_seed(3))
    w, mu, cov = teacher.weights, teacher.means, teacher.covs
    mean = (w[:, None] * mu).sum(0)
    second = (w[:, None, None] * (cov + mu[:, :, None] * mu[:, None, :])).sum(0)
    assert torch.allclose(x.mean(0), mean, atol=0.01)
    assert torch.allclose(torch.cov(x.T), second - mean[:, None] * mean[None, :], atol=0.01)


def test_data_density_integrates_to_one():
    teacher = load_teacher("gmm:ring8")
    g = torch.linspace(-4, 4, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    dens = teacher.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).exp()
    assert float(dens.sum() * (g[1] - g[0]) ** 2) == pytest.approx(1.0, abs=1e-4)


def test_reference_ode_solver_matches_the_closed_form_at_fourth_order():
    teacher = load_teacher("gmm:gauss2d")
    s = teacher.schedule
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    exact = teacher.exact_ode_solution(x, s.t_max, s.t_min)
    e1 = rmse(ode_reference(teacher.denoise, x, s.t_max, s.t_min, s, steps=100), exact)
    e2 = rmse(ode_reference(teacher.denoise, x, s.t_max, s.t_min, s, steps=200), exact)
    assert e2 < 1e-6 and 3.6 < torch.log2(torch.tensor(e1 / e2)) < 4.4  # RK4: error ratio 2^4


def test_bad_specs_and_inputs_fail_clearly():
    with pytest.raises(ValueError, match="unknown gmm preset 'ring9'; allowed: ring8, aniso2d, gauss2d, mix16"):
        load_teacher("gmm:ring9")
    with pytest.raises(ValueError, match="unknown schedule 'vp'"):
        load_teacher("gmm:ring8@vp")
    teacher = load_teacher("gmm:ring8")
    with pytest.raises(ValueError, match=r"expects x of shape \[B, 2\], got \[4, 3\]"):
        teacher.denoise(torch.zeros(4, 3), 0.5)
    with pytest.raises(ValueError, match=r"class labels .* must lie in \[-1, 7\]"):
        teacher.denoise(torch.zeros(2, 2), 0.5, torch.tensor([0, 8]))
