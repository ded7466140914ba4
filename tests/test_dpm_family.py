"""Convergence order of the DPM-Solver family on analytic Gaussian-mixture teachers, and its NFE accounting.

The error e_N of an N-step solve from t_max to t_min (final="t_min", uniform-logSNR grid) against the exact ODE
solution falls as N^-p for a method of order p, so log2(e_N / e_2N) -> p.

Tolerance: |slope - p| < 0.3. At the step counts used, every slope measured here lies within 0.15 of its order
(listed per case below), and 0.3 still separates adjacent orders: a method that lost one order would show a slope
near p - 1, at least 0.7 outside the band. On gauss2d (one Gaussian: the ODE is linear) some methods converge faster
than their order (dpmpp_3m: slope 4.05), so there only the lower bound is asserted.
"""

import math

import pytest
import torch

from distill.core.grids import make_grid
from distill.eval.exact import ode_reference, rmse
from distill.solvers import get_solver, sample
from teachers import load_teacher

TOL = 0.3
# (solver, options, order p, N): slope log2(e_N / e_2N); measured gauss2d / aniso2d slopes in the comments
CASES = [
    ("dpm_solver_2", {}, 2, 32),  # 2.04 / 2.05
    ("dpmpp_2s", {}, 2, 64),  # 1.98 / 1.94 (= dpm_solver_2 with predict="data")
    ("dpm_solver_3", {}, 3, 32),  # 3.17 / 2.87
    ("dpm_solver_3", {"predict": "data"}, 3, 64),  # 2.89 / 2.88 (2.75 / 2.75 at N = 32: still approaching 3)
    ("dpm_solver_3", {"stage2": "midpoint"}, 3, 32),  # 2.97 / 3.03 (diffusers' second stage)
    ("dpmpp_3m", {}, 3, 64),  # 4.05 / 3.09
    # diffusers' 3M weights its second difference by half (see dpmpp_3m): only second order. 2.07 / 2.14
    ("dpmpp_3m", {"halve_d2": True}, 2, 64),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in opts.items()) for name, opts, _, _ in CASES]


def _x_T(n=200):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _slope(teacher, ref, x, name, opts, n):
    s = teacher.schedule
    errs = [rmse(get_solver(name).fn(teacher.denoise, x, make_grid(s, k, "logsnr", final="t_min"), schedule=s, **opts), ref)
            for k in (n, 2 * n)]
    return math.log2(errs[0] / errs[1])


@pytest.fixture(scope="module")
def aniso2d():
    """The aniso2d teacher, x_T and a float64 RK4 reference (300 steps: 2e-8 from the 400-step solution, below 1% of
    the smallest solver error compared here)."""
    teacher, x = load_teacher("gmm:aniso2d"), _x_T()
    s = teacher.schedule
    return teacher, x, ode_reference(teacher.denoise, x, s.t_max, s.t_min, s, steps=300)


@pytest.mark.parametrize("name,opts,order,n", CASES, ids=IDS)
def test_convergence_order_gauss2d_exact(name, opts, order, n):
    teacher, x = load_teacher("gmm:gauss2d"), _x_T()
    ref = teacher.exact_ode_solution(x, teacher.schedule.t_max, teacher.schedule.t_min)
    assert _slope(teacher, ref, x, name, opts, n) > order - TOL


@pytest.mark.parametrize("name,opts,order,n", CASES, ids=IDS)
def test_convergence_order_aniso2d(aniso2d, name, opts, order, n):
    teacher, x, ref = aniso2d
    assert abs(_slope(teacher, ref, x, name, opts, n) - order) < TOL


def test_intermediate_points_sit_at_lam_fractions():
    """DPM-Solver-3 evaluates at lam_i + h/3 and lam_i + 2h/3 (Lu et al. 2022, Alg. 2), DPM-Solver-2 at lam_i + h/2."""
    teacher = load_teacher("gmm:aniso2d")
    s, seen = teacher.schedule, []

    def spy(x, t, cond=None):
        seen.append(float(s.lam(t[0])))
        return teacher.denoise(x, t, cond)

    ts = make_grid(s, 2, final="t_min")
    lam = s.lam(ts).tolist()
    for name, rs in (("dpm_solver_2", (0.5,)), ("dpm_solver_3", (1 / 3, 2 / 3))):
        seen.clear()
        get_solver(name).fn(spy, _x_T(4), ts, schedule=s)
        want = [v for a, b in zip(lam, lam[1:]) for v in [a, *(a + r * (b - a) for r in rs)]]
        assert seen == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("name,nfe,final", [("dpm_solver_2", 9, "clean"), ("dpm_solver_2", 10, "t_min"),
                                            ("dpmpp_2s", 5, "clean"), ("dpm_solver_3", 10, "clean"),
                                            ("dpm_solver_3", 9, "t_min"), ("dpmpp_3m", 7, "clean"), ("ddpm", 6, "clean"),
                                            ("dpmpp_2m_sde", 6, "t_min")])
def test_nfe_is_spent_exactly(name, nfe, final):
    """2 NFE per single-step second-order step and 3 per third-order step; the step into clean data costs 1."""
    x0, info = sample(load_teacher("gmm:ring8"), _x_T(8), solver=name, nfe=nfe, final=final, return_info=True)
    assert info["nfe"] == nfe and torch.isfinite(x0).all()


@pytest.mark.parametrize("name,nfe,final,near", [("dpm_solver_3", 9, "clean", "[7, 10]"), ("dpm_solver_2", 6, "clean", "[5, 7]"),
                                                 ("dpm_solver_3", 10, "t_min", "[9, 12]")])
def test_nfe_that_does_not_fit_names_the_nearest(name, nfe, final, near):
    with pytest.raises(ValueError, match=rf"cannot spend exactly {nfe} NFE .*nearest possible: \{near}"):
        sample(load_teacher("gmm:ring8"), _x_T(8), solver=name, nfe=nfe, final=final)


def test_mid_ts_are_checked():
    teacher = load_teacher("gmm:ring8")
    with pytest.raises(ValueError, match="mid_ts needs one list per step"):
        sample(teacher, _x_T(8), solver="dpm_solver_2", timesteps=[1.0, 0.5], mid_ts=[[0.7]])
    with pytest.raises(ValueError, match=r"mid_ts\[0\].*strictly between"):
        sample(teacher, _x_T(8), solver="dpm_solver_2", timesteps=[1.0, 0.5], final="t_min", mid_ts=[[0.4]])
    with pytest.raises(ValueError, match="at most 2"):
        sample(teacher, _x_T(8), solver="dpm_solver_3", timesteps=[1.0, 0.5], final="t_min", mid_ts=[[0.9, 0.8, 0.7]])
    with pytest.raises(ValueError, match="clean point takes none"):
        sample(teacher, _x_T(8), solver="dpm_solver_2", timesteps=[1.0], mid_ts=[[0.5]])
    with pytest.raises(ValueError, match="unknown predict"):
        sample(teacher, _x_T(8), solver="dpm_solver_2", nfe=5, predict="velocity")


def test_single_step_refuses_to_start_at_zero_alpha():
    """Rectified flow at t = 1 has lam = -inf: no lam fraction exists there (and the noise form divides by alpha)."""
    teacher = load_teacher("gmm:ring8@rectified_flow")
    with pytest.raises(ValueError, match="finite log-SNR"):
        sample(teacher, _x_T(8), solver="dpm_solver_2", nfe=5)
    x0 = sample(teacher, _x_T(8), solver="dpm_solver_3", timesteps=[0.99, 0.5, 0.1], final="t_min")
    assert torch.isfinite(x0).all()
