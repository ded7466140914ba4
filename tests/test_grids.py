import math

import pytest
import torch

from distill.core.grids import GRIDS, explicit_grid, make_grid
from distill.core.schedules import EDM, DiscreteVP, RectifiedFlow, VPLinear

SCHEDULES = [DiscreteVP(), VPLinear(), EDM(), RectifiedFlow()]


@pytest.mark.parametrize("kind", GRIDS)
@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: s.kind)
def test_grid_shape_endpoints_and_order(kind, s):
    ts = make_grid(s, 7, kind)
    assert ts.shape == (8,) and ts[0] == s.t_max and ts[-2] == s.t_min and ts[-1] == s.t_clean
    assert bool((ts[1:] < ts[:-1]).all())
    ts = make_grid(s, 7, kind, final="t_min")
    assert ts.shape == (8,) and ts[0] == s.t_max and ts[-1] == s.t_min
    direct = make_grid(s, 7, kind, final="direct")  # the t_min grid with its last point moved to clean
    assert torch.equal(direct[:-1], ts[:-1]) and direct[-1] == s.t_clean


@pytest.mark.parametrize("steps", [1, 2, 4, 10])
def test_direct_uniform_grid_is_diffusers_linspace_spacing(steps):
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(timestep_spacing="linspace", final_sigmas_type="zero")
    sched.set_timesteps(steps)
    ts = make_grid(DiscreteVP(), steps, "uniform", final="direct")
    # diffusers rounds linspace(0, 999, steps + 1)[::-1][:-1] to integers, then steps to sigma = 0
    assert torch.allclose(ts[:-1], sched.timesteps.double(), atol=0.5) and ts[-1] == DiscreteVP().t_clean


def test_spacings_are_what_they_say():
    s = VPLinear()
    lam = s.lam(make_grid(s, 10, "logsnr", final="t_min"))
    assert torch.allclose(lam.diff(), lam.diff()[0].expand(10), rtol=1e-9)
    t = make_grid(s, 10, "uniform", final="t_min")
    assert torch.allclose(t.diff(), t.diff()[0].expand(10), rtol=1e-9)
    q = make_grid(s, 10, "quadratic", final="t_min").sqrt()
    assert torch.allclose(q.diff(), q.diff()[0].expand(10), rtol=1e-9)


def test_karras_grid_equals_edm_formula():
    # Karras et al. 2022, Eq. 5 with sigma_min = 0.002, sigma_max = 80, rho = 7 (k-diffusion's get_sigmas_karras)
    n, rho = 18, 7.0
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    expected = (80 ** (1 / rho) + ramp * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    ts = make_grid(EDM(), n, "karras")
    assert torch.allclose(ts[:-1], expected, rtol=1e-12) and ts[-1] == 0


def test_rectified_flow_lam_grids_start_at_pure_noise():
    s = RectifiedFlow()
    ts = make_grid(s, 5, "logsnr")
    assert ts[0] == 1.0 and math.isinf(float(s.lam(ts[0]))) and bool(torch.isfinite(s.lam(ts[1:-1])).all())


def test_explicit_grid_appends_the_clean_point():
    s = DiscreteVP()
    assert explicit_grid(s, [999, 500, 0]).tolist() == [999, 500, 0, -1]
    assert explicit_grid(s, [999, 500, 0], final="t_min").tolist() == [999, 500, 0]


@pytest.mark.parametrize("call,message", [
    (lambda: make_grid(VPLinear(), 5, "cosine"), "unknown grid 'cosine'; allowed: uniform, logsnr, karras, quadratic"),
    (lambda: make_grid(VPLinear(), 5, final="zero"), "unknown final 'zero'; allowed: clean, t_min, direct"),
    (lambda: make_grid(VPLinear(), 0), "steps must be at least 1"),
    (lambda: explicit_grid(DiscreteVP(), [10, 20]), "strictly decreasing"),
    (lambda: explicit_grid(DiscreteVP(), [1500, 20]), "must lie in"),
])
def test_bad_grids_fail_clearly(call, message):
    with pytest.raises(ValueError, match=message):
        call()
