"""DPM-Solver-v3: degenerate statistics give DPM-Solver++ exactly, its convergence order, EMS against their
analytic values on one Gaussian, the statistics file tied to its teacher."""

import math

import pytest
import torch

from distill.eval.exact import rmse
from distill.solvers import SOLVERS, sample
from distill.solvers.prepared.dpm_v3.ems import EmsConfig, EmsRun
from distill.solvers.prepared.dpm_v3.solver import EMS, taylor_derivatives
from teachers import load_teacher


def _noise(n=300, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("steps", [4, 7, 12])
@pytest.mark.parametrize("final", ["direct", "clean", "t_min"])
@pytest.mark.parametrize("order,baseline", [(2, "dpmpp_2m"), (3, "dpmpp_3m")])
def test_degenerate_statistics_reproduce_dpm_solver_pp(steps, final, order, baseline):
    # l = 1, s = b = 0 turns every v3 integral into DPM-Solver++'s phi functions; the quadrature is exact for them,
    # so the two agree to rounding (observed 1e-15). 2M's order-2 rule is the "midpoint" one.
    teacher = load_teacher("gmm:aniso2d")
    nfe = SOLVERS[baseline].nfe(steps, final != "t_min")
    want = sample(teacher, _noise(), solver=baseline, nfe=nfe, grid="uniform", final=final)
    lams = teacher.schedule.lam(torch.tensor([teacher.schedule.t_max, teacher.schedule.t_min]))
    ems = EMS.degenerate(torch.linspace(float(lams[0]), float(lams[1]), 200), (2,))
    got = sample(teacher, _noise(), solver="dpm_solver_v3", nfe=nfe, grid="uniform", final=final, ems=ems, order=order,
                 use_corrector=False, solver_type="midpoint", lower_order_final=order == 3)  # 2M never lowers its order
    assert float((got - want).abs().max()) < 1e-12


def test_degenerate_taylor_rule_is_the_default_and_differs_from_2m():
    teacher = load_teacher("gmm:aniso2d")
    a = sample(teacher, _noise(), solver="dpm_solver_v3", nfe=6, order=2, use_corrector=False)
    b = sample(teacher, _noise(), solver="dpmpp_2m", nfe=6)
    assert float((a - b).abs().max()) > 1e-6


# (options, order p): slope log2(e_64 / e_128) on a log-SNR grid, measured gauss2d / aniso2d in the comments. The
# corrector adds one order (UniC); pseudo-order 3 takes k! times divided differences, whose second derivative is only
# first-order accurate: second order. Band 0.3 against the RK4 reference on aniso2d (as tests/test_dpm_family.py);
# on gauss2d (a linear ODE, where some rules gain an order) only the lower bound.
ORDER_CASES = [
    ({"order": 1, "use_corrector": False}, 1),  # 0.99 / 1.00
    ({"order": 2, "use_corrector": False}, 2),  # 2.02 / 2.02
    ({"order": 3, "use_corrector": False}, 3),  # 4.05 / 3.09
    ({"order": 1}, 2),  # 2.01 / 1.97
    ({"order": 2}, 3),  # 3.01 / 2.95
    ({}, 4),  # the defaults: order 3 with the corrector, 3.68 / 3.92
    ({"order": 3, "p_pseudo": True, "use_corrector": False}, 2),  # 2.02 / 2.02
]


def _slope(spec, opts):
    from distill.eval.exact import ode_reference

    teacher, x = load_teacher(spec), _noise(200)
    s = teacher.schedule
    if spec == "gmm:gauss2d":
        ref = teacher.exact_ode_solution(x, s.t_max, s.t_min)
    else:
        ref = ode_reference(teacher.denoise, x, s.t_max, s.t_min, s, steps=300)
    errs = [rmse(sample(teacher, x, solver="dpm_solver_v3", nfe=n, final="t_min", lower_order_final=False, **opts), ref)
            for n in (64, 128)]
    return math.log2(errs[0] / errs[1])


@pytest.mark.parametrize("opts,order", ORDER_CASES)
def test_convergence_order(opts, order):
    assert _slope("gmm:gauss2d", opts) > order - 0.4  # 4th order at 128 steps nears rounding (error 1e-11)
    assert abs(_slope("gmm:aniso2d", opts) - order) < 0.3
    if not opts:
        assert SOLVERS["dpm_solver_v3"].order == order


def test_taylor_derivatives_exact_on_a_cubic_and_pseudo_on_a_line():
    lams = [0.0, -0.3, -0.7, -1.2]
    cubic = [torch.tensor(1 + 2 * u + 3 * u**2 + 4 * u**3) for u in lams]
    d = taylor_derivatives(cubic, lams, pseudo=False)
    assert [round(float(v), 9) for v in d] == [1.0, 2.0, 6.0, 24.0]
    line = [torch.tensor(1 + 2 * u) for u in lams[:3]]
    assert [round(float(v), 9) for v in taylor_derivatives(line, lams[:3], pseudo=True)] == [1.0, 2.0, 0.0]


# -- EMS on one Gaussian: l = sigma^2 diag(K^-1), K = alpha^2 Sigma + sigma^2 I; f, f_d affine in x --------------
def _exact(teacher, lam):
    sch, mu, cov = teacher.schedule, teacher.means[0], teacher.covs[0]
    t = sch.t_of_lam(torch.tensor(lam, dtype=torch.float64))
    a, s = float(sch.alpha(t)), float(sch.sigma(t))
    k_inv = torch.linalg.inv(a * a * cov + s * s * torch.eye(2, dtype=torch.float64))
    l = s * s * torch.diagonal(k_inv)
    return a, s, k_inv, l, (s * s * k_inv - torch.diag(l)) / a, -s * s * k_inv @ mu  # f = A x + c


def analytic_ems(teacher, lam, dl=1e-5):
    """l, s, b of one Gaussian under VP: f_d = M x + m from d/dlam of f = A x + c along dx/dlam = sigma^2 x - sigma eps,
    and s, b the per-dimension regression of f_d on f for x ~ N(alpha mu, K)."""
    mu, cov = teacher.means[0], teacher.covs[0]
    a, s, k_inv, l, A, c = _exact(teacher, lam)
    (_, _, _, _, A_p, c_p), (_, _, _, _, A_m, c_m) = _exact(teacher, lam + dl), _exact(teacher, lam - dl)
    eye = torch.eye(2, dtype=torch.float64)
    M = (A_p - A_m) / (2 * dl) + A @ (s * s * eye - s * s * k_inv)
    m = (c_p - c_m) / (2 * dl) + A @ (s * s * k_inv @ (a * mu))
    K = a * a * cov + s * s * eye
    slope = torch.diagonal(M @ K @ A.T) / torch.diagonal(A @ K @ A.T)
    return l, slope, (M @ (a * mu) + m) - slope * (A @ (a * mu) + c)


def test_ems_match_their_analytic_values_on_one_gaussian(tmp_path):
    # 8,000 exact data points, 121 lam points, no smoothing. Errors seen: l up to 1.5% (Hutchinson, off-diagonal terms
    # / sqrt(n)), s and b about 1% (sampling error of the regression and O(dlam^2) of the differences of l);
    # the end points use one-sided differences and are checked more loosely.
    teacher = load_teacher("gmm:gauss2d")
    cfg = EmsConfig(n_lams=120, num_samples=8000, batch_size=8000, smooth=0)
    x0 = teacher.sample_data(8000, torch.Generator().manual_seed(1))
    ems = EmsRun(teacher.denoise, teacher.schedule, x0, None, cfg, teacher_hash=teacher.hash).run(progress=False)
    for j in range(0, 121, 10):
        l, s, b = analytic_ems(teacher, float(ems.lams[j]))
        tol = 0.15 if j in (0, 120) else 0.04
        assert torch.allclose(ems.l[j], l, rtol=0.03, atol=1e-5), (j, ems.l[j], l)
        assert torch.allclose(ems.s[j], s, rtol=tol, atol=0.02), (j, ems.s[j], s)
        assert torch.allclose(ems.b[j], b, rtol=tol, atol=0.01), (j, ems.b[j], b)
    # a solve with the estimated statistics stays on the exact solution at a few steps
    path = tmp_path / "ems.safetensors"
    ems.save(path)
    s_, noise = teacher.schedule, _noise(200)
    ref = teacher.exact_ode_solution(noise * float(s_.init_noise_scale(s_.t_max)), s_.t_max, s_.t_min)
    err = rmse(sample(teacher, noise, solver="dpm_solver_v3", nfe=6, final="t_min", ems=str(path)), ref)
    assert err < 0.05


def test_ems_file_of_another_teacher_is_refused(tmp_path):
    teacher, other = load_teacher("gmm:gauss2d"), load_teacher("gmm:aniso2d")
    lams = teacher.schedule.lam(torch.tensor([teacher.schedule.t_max, teacher.schedule.t_min]))
    ems = EMS.degenerate(torch.linspace(float(lams[0]), float(lams[1]), 10), (2,))
    ems.teacher_hash = teacher.hash
    ems.save(tmp_path / "ems.safetensors")
    with pytest.raises(ValueError, match="was made from teacher .* not from 'gmm:aniso2d'"):
        sample(other, _noise(), solver="dpm_solver_v3", nfe=5, ems=str(tmp_path / "ems.safetensors"))
    sample(teacher, _noise(), solver="dpm_solver_v3", nfe=5, ems=str(tmp_path / "ems.safetensors"))


def test_ems_state_resumes_and_refuses_other_settings(tmp_path):
    teacher = load_teacher("gmm:gauss2d")
    x0 = teacher.sample_data(64, torch.Generator().manual_seed(1))
    cfg = EmsConfig(n_lams=4, num_samples=64, batch_size=32, smooth=1)
    state = tmp_path / "state.pt"
    full = EmsRun(teacher.denoise, teacher.schedule, x0, None, cfg, teacher_hash=teacher.hash).run(progress=False)
    run = EmsRun(teacher.denoise, teacher.schedule, x0, None, cfg, teacher_hash=teacher.hash, state_path=state)
    run.state["sb"] = {}
    first = run.run(progress=False)
    state_dict = torch.load(state, weights_only=False)
    del state_dict["sb"][3]  # as if interrupted before the last units
    del state_dict["sb"][4]
    torch.save(state_dict, state)
    resumed = EmsRun(teacher.denoise, teacher.schedule, x0, None, cfg, teacher_hash=teacher.hash, state_path=state).run(progress=False)
    for a, b in ((full, first), (first, resumed)):
        assert torch.equal(a.l, b.l) and torch.equal(a.s, b.s) and torch.equal(a.b, b.b)
    with pytest.raises(ValueError, match="settings"):
        EmsRun(teacher.denoise, teacher.schedule, x0, None, EmsConfig(n_lams=5, num_samples=64), teacher_hash=teacher.hash,
               state_path=state)
    with pytest.raises(ValueError, match="belongs to teacher"):
        EmsRun(teacher.denoise, teacher.schedule, x0, None, cfg, teacher_hash="0" * 64, state_path=state)


@pytest.mark.parametrize("beta_schedule", ["squaredcos_cap_v2", "linear"])
def test_ems_grid_ends_have_the_true_derivative_in_lam(beta_schedule):
    """At exactly t_max the schedule's clamps made d log alpha / d lam zero (it is sigma^2 for VP), which turned
    s and b at t_max into noise of size 1e5 on mnist16; the grid's ends lie just inside."""
    from distill.core.schedules import DiscreteVP
    from distill.solvers.prepared.dpm_v3.ems import _dlog_alpha_dlam, lam_grid

    schedule = DiscreteVP(beta_schedule=beta_schedule)
    for lam in lam_grid(schedule, 10)[[0, -1]]:
        sigma2 = float(schedule.sigma(schedule.t_of_lam(lam.reshape(1)))[0]) ** 2
        assert _dlog_alpha_dlam(schedule, float(lam)) == pytest.approx(sigma2, rel=1e-6)
