import pytest
import torch

from distill.core.param import PREDICTION_TYPES, from_x0, to_x0
from distill.core.schedules import DiscreteVP, RectifiedFlow


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("schedule", [DiscreteVP(), RectifiedFlow()], ids=["vp", "rf"])
def test_round_trip_from_the_true_x0(prediction_type, schedule):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64) * (schedule.t_max if schedule.kind != "rectified_flow" else 1)
    a, s = schedule.alpha(t), schedule.sigma(t)
    x = a[:, None] * x0 + s[:, None] * eps
    pred = from_x0(x0, prediction_type, x, a, s)
    expected = {"epsilon": eps, "sample": x0, "v_prediction": a[:, None] * eps - s[:, None] * x0, "flow": eps - x0,
                "both": torch.cat([x0, eps], 1)}
    assert torch.allclose(pred, expected[prediction_type], atol=1e-12)
    assert torch.allclose(to_x0(pred, prediction_type, x, a, s), x0, atol=1e-12)


def test_v_matches_diffusers_get_velocity():
    from diffusers import DDPMScheduler

    sched, ours = DDPMScheduler(), DiscreteVP()
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([5, 500, 990])
    v = sched.get_velocity(x0, eps, t)
    x = sched.add_noise(x0, eps, t)
    assert torch.allclose(from_x0(x0, "v_prediction", x, ours.alpha(t), ours.sigma(t)), v, atol=1e-10)


def test_unknown_prediction_type():
    with pytest.raises(ValueError, match="unknown prediction_type 'score'; allowed: epsilon, sample, v_prediction, flow"):
        to_x0(torch.zeros(1), "score", torch.zeros(1), 1.0, 1.0)
