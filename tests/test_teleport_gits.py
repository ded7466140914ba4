"""Gaussian teleportation (exact on one Gaussian) and GITS (the DP finds the grid its cost matrix calls optimal)."""

import pytest
import torch

from distill.core.grids import make_grid
from distill.eval.exact import rmse
from distill.solvers import sample
from distill.solvers.prepared.gits import search as gits
from distill.solvers.prepared.teleport.gaussian import GaussianFit, fit_gaussian, gaussian_denoiser, gaussian_flow, handoff_time
from teachers import load_teacher


def _noise(n=300, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _exact_fit(teacher):
    """The fit of gauss2d's own mean and covariance (what fit_gaussian tends to with many samples)."""
    eigvals, eigvecs = torch.linalg.eigh(teacher.covs[0])
    return GaussianFit(teacher.means, eigvals[None], eigvecs[None], (2,), 0, teacher.hash)


@pytest.mark.parametrize("schedule", ["vp_linear", "vp_cosine", "discrete_vp", "edm", "ve", "rectified_flow"])
def test_teleport_is_the_exact_ode_solution_on_one_gaussian(schedule):
    teacher = load_teacher(f"gmm:gauss2d@{schedule}")
    s, fit = teacher.schedule, _exact_fit(teacher)
    x_T = _noise() * float(s.init_noise_scale(s.t_max))
    for t_to in (make_grid(s, 4, "logsnr", final="t_min")[1:]).tolist():
        want = teacher.exact_ode_solution(x_T, s.t_max, t_to) if schedule != "rectified_flow" else None
        got = gaussian_flow(fit, x_T, s, s.t_max, t_to)
        if want is None:  # alpha_T = 0: compare with a fine DDIM solve of the exact denoiser instead
            want = sample(teacher, _noise(), solver="dpmpp_3m", timesteps=make_grid(s, 400, "logsnr", final="t_min",
                          t_max=s.t_max, t_min=t_to)[:-1].tolist() + [t_to], final="t_min")
            assert rmse(got, want) < 1e-4
        else:
            assert float((got - want).abs().max()) < 1e-12
    d = gaussian_denoiser(fit, s)(x_T, torch.full((len(x_T),), 0.3 * s.t_max, dtype=torch.float64))
    assert torch.allclose(d, teacher.denoise(x_T, 0.3 * s.t_max), atol=1e-12)


def test_sample_with_teleport_skips_the_jump_for_free_and_is_exact_to_the_handoff():
    teacher = load_teacher("gmm:gauss2d")
    s, fit = teacher.schedule, _exact_fit(teacher)
    x, info = sample(teacher, _noise(), solver="euler", nfe=1, final="t_min", teleport=fit, handoff_sigma=0.05,
                     return_info=True)
    t_h = handoff_time(s, 0.05)
    assert info["nfe"] == 1 and abs(float(info["ts"][0]) - t_h) < 1e-12
    exact = teacher.exact_ode_solution(_noise(), s.t_max, s.t_min)
    assert rmse(x, exact) < 0.01  # one Euler step from sigma 0.05: the teleported part adds no error
    # the fitted version from exact samples converges to the exact fit
    x0 = teacher.sample_data(100_000, torch.Generator().manual_seed(0))
    fitted = fit_gaussian(x0, teacher_hash=teacher.hash)
    assert torch.allclose(fitted.mean, teacher.means, atol=0.01) and torch.allclose(fitted.eigvals, fit.eigvals, atol=0.01)


def test_per_class_fit_and_file_round_trip(tmp_path):
    teacher = load_teacher("gmm:aniso2d")
    cond = torch.arange(3000) % 4 - 1  # -1, 0, 1, 2
    x0 = teacher.sample_data(3000, torch.Generator().manual_seed(0), cond=cond.clamp(min=-1))
    fit = fit_gaussian(x0, cond, num_classes=3, teacher_hash=teacher.hash)
    assert fit.mean.shape == (4, 2) and torch.allclose(fit.mean[1], teacher.means[1], atol=0.05)
    fit.save(tmp_path / "g.safetensors")
    back = GaussianFit.load(tmp_path / "g.safetensors", teacher)
    assert torch.equal(back.eigvecs, fit.eigvecs) and back.num_classes == 3
    x = sample(teacher, _noise(4), solver="unipc", nfe=4, teleport=str(tmp_path / "g.safetensors"), handoff_sigma=2.0,
               cond=torch.tensor([0, 1, 2, -1]))
    assert bool(torch.isfinite(x).all())
    with pytest.raises(ValueError, match="was made from teacher"):
        GaussianFit.load(tmp_path / "g.safetensors", load_teacher("gmm:ring8"))


def test_teleport_options_fail_clearly():
    teacher = load_teacher("gmm:gauss2d")
    fit = _exact_fit(teacher)
    with pytest.raises(ValueError, match="handoff_sigma"):
        sample(teacher, _noise(), solver="euler", nfe=2, teleport=fit)
    with pytest.raises(ValueError, match="outside this schedule's noise levels"):
        sample(teacher, _noise(), solver="euler", nfe=2, teleport=fit, handoff_sigma=1e6)
    with pytest.raises(ValueError, match="option of teleport"):
        sample(teacher, _noise(), solver="euler", nfe=2, handoff_sigma=1.0)


# -- GITS ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def warmup():
    teacher = load_teacher("gmm:aniso2d")
    s = teacher.schedule
    fine = gits.fine_grid(s, 12)
    x_T = _noise(256)
    states, denoised = gits.warmup_trajectories(teacher.denoise, s, x_T, fine)
    return teacher, fine, gits.cost_matrix(states, denoised, s, fine)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("coeff", [1.0, 1.15])
def test_dp_finds_the_brute_force_optimum(warmup, steps, coeff):
    _, _, cost = warmup
    path, value = gits.dp_search(cost, steps, coeff)
    best, best_value = gits.brute_force_search(cost, steps, coeff)
    assert path == best and abs(value - best_value) < 1e-12 * max(1.0, best_value)
    assert abs(gits.path_cost(cost, path, coeff) - value) < 1e-12 * max(1.0, value)


def test_cost_matrix_is_the_measured_first_order_error(warmup):
    teacher, fine, cost = warmup
    upper = torch.ones_like(cost, dtype=torch.bool).triu(1)
    assert bool(torch.isinf(cost[~upper]).all()) and bool(torch.isfinite(cost[upper]).all())
    # C[0, -1]: one DDIM step from x_T straight to clean, against the warm-up output
    x = sample(teacher, _noise(256), solver="euler", timesteps=fine[:1].tolist(), final="clean")
    ref = gits.warmup_trajectories(teacher.denoise, teacher.schedule, _noise(256), fine)[0][-1]
    assert abs(float(cost[0, -1]) - float((x - ref).pow(2).mean(-1).sqrt().mean())) < 1e-12


def test_searched_grid_file_feeds_any_solver_and_is_tied_to_its_teacher(warmup, tmp_path):
    teacher, fine, cost = warmup
    data = gits.save_grids(tmp_path / "gits.json", teacher, fine, cost, [2, 3, 4], coeff=1.15, final="direct", meta={})
    x, info = sample(teacher, _noise(), solver="unipc", nfe=3, grid=str(tmp_path / "gits.json"), final="direct",
                     return_info=True)
    assert info["ts"].tolist() == data["grids"]["3"]["ts"] and info["nfe"] == 3
    with pytest.raises(ValueError, match="no grid for 5 steps"):
        sample(teacher, _noise(), solver="unipc", nfe=5, grid=str(tmp_path / "gits.json"), final="direct")
    with pytest.raises(ValueError, match="was made from teacher"):
        sample(load_teacher("gmm:ring8"), _noise(), solver="unipc", nfe=3, grid=str(tmp_path / "gits.json"), final="direct")
    with pytest.raises(ValueError, match="not 'clean'"):
        sample(teacher, _noise(), solver="unipc", nfe=3, grid=str(tmp_path / "gits.json"), final="clean")
