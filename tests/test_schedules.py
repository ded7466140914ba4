import math

import pytest
import torch

from distill.core.schedules import (
    EDM,
    SCHEDULES,
    VE,
    DiscreteVP,
    RectifiedFlow,
    VPCosine,
    VPLinear,
    beta_table,
    get_schedule,
    schedule_from_config,
)


@pytest.mark.parametrize("beta_schedule,kwargs", [
    ("linear", {}),
    ("scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
    ("squaredcos_cap_v2", {}),
])
def test_alphas_cumprod_equal_diffusers_bit_for_bit(beta_schedule, kwargs):
    from diffusers import DDPMScheduler

    ours = DiscreteVP(beta_schedule, **kwargs)
    theirs = DDPMScheduler(beta_schedule=beta_schedule, **kwargs)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    t = torch.arange(1000, dtype=torch.float64)
    # alpha(t) goes through exp(0.5 log acp): float64 round-off only (|log acp| < 25 -> rel. error < 1e-13)
    assert torch.allclose(ours.alpha(t) ** 2, ours.alphas_cumprod.double(), rtol=1e-13, atol=0)


def test_trained_betas_and_unknown_beta_schedule():
    betas = torch.linspace(1e-4, 0.02, 50).tolist()
    assert torch.equal(DiscreteVP(trained_betas=betas, num_train_timesteps=50).alphas_cumprod,
                       torch.cumprod(1 - torch.tensor(betas, dtype=torch.float32), 0))
    with pytest.raises(ValueError, match="unknown beta_schedule 'sigmoid'; allowed: linear, scaled_linear, squaredcos_cap_v2"):
        beta_table("sigmoid")


def test_discrete_vp_interpolates_lam_linearly_between_timesteps():
    s = DiscreteVP()
    lam = s.lam(torch.tensor([10.0, 11.0, 10.25]))
    assert lam[2].item() == pytest.approx(0.75 * lam[0].item() + 0.25 * lam[1].item(), abs=1e-12)


ALL = [DiscreteVP(), DiscreteVP("squaredcos_cap_v2"), VPLinear(), VPCosine(), VE(), EDM(), RectifiedFlow()]


@pytest.mark.parametrize("s", ALL, ids=lambda s: s.kind)
def test_lam_inverse_round_trip(s):
    t = torch.linspace(s.t_min, s.t_max, 97, dtype=torch.float64)
    if s.kind == "rectified_flow":
        t = t[:-1]  # lam(1) = -inf
    assert torch.allclose(s.t_of_lam(s.lam(t)), t, rtol=1e-9, atol=1e-9 * s.t_max)
    lam = s.lam(t)
    assert bool((lam[1:] < lam[:-1]).all()), "lam must decrease in t"


@pytest.mark.parametrize("s", ALL, ids=lambda s: s.kind)
def test_clean_point(s):
    assert float(s.alpha(s.t_clean)) == 1.0 and float(s.sigma(s.t_clean)) == 0.0
    assert math.isinf(float(s.lam(s.t_clean))) and float(s.t_of_lam(math.inf)) == s.t_clean
    assert float(s.sigma(s.t_min)) > 0


def test_process_definitions():
    t = torch.linspace(0.01, 0.99, 11, dtype=torch.float64)
    for s in (VPLinear(), VPCosine(), DiscreteVP()):
        tt = t * s.t_max
        assert torch.allclose(s.alpha(tt) ** 2 + s.sigma(tt) ** 2, torch.ones_like(tt), atol=1e-12)
    assert torch.allclose(RectifiedFlow().alpha(t), 1 - t) and torch.allclose(RectifiedFlow().sigma(t), t)
    assert torch.allclose(EDM().sigma(t * 80), t * 80) and torch.allclose(EDM().alpha(t), torch.ones_like(t))
    ve = VE(sigma_min=0.01, sigma_max=50)
    assert float(ve.sigma(1.0)) == pytest.approx(50) and float(ve.sigma(0.5)) == pytest.approx(math.sqrt(0.01 * 50))


def test_vp_linear_alpha_is_the_integral_of_beta():
    # log alpha(t) = -1/2 int_0^t beta(s) ds with beta(s) = beta_0 + s (beta_1 - beta_0): check by quadrature
    s, t = VPLinear(), 0.7
    grid = torch.linspace(0, t, 10001, dtype=torch.float64)
    integral = torch.trapezoid(0.1 + grid * 19.9, grid)
    assert float(s.alpha(t).log()) == pytest.approx(-0.5 * float(integral), rel=1e-9)


def test_vp_cosine_matches_alpha_bar():
    s, t = VPCosine(), torch.tensor([0.3, 0.6], dtype=torch.float64)
    f = lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert torch.allclose(s.alpha(t) ** 2, f(t) / f(torch.zeros(1, dtype=torch.float64)), rtol=1e-12)


def test_config_round_trip_and_lookup():
    for s in ALL:
        assert schedule_from_config(s.config()).config() == s.config()
    assert set(SCHEDULES) == {"discrete_vp", "vp_linear", "vp_cosine", "ve", "edm", "rectified_flow"}
    with pytest.raises(ValueError, match="unknown schedule 'vp'; allowed: discrete_vp"):
        get_schedule("vp")
