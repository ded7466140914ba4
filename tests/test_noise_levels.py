"""Noise levels of the distribution-matching family against each method's reference distribution: the GAN's (DMD2,
f-distill: a uniform index of the Karras grid; SiD, Uni-Instruct: lognormal(-1.2, 1.2) in sigma/alpha) whatever the
generator loss's ``time_sampling``, the fake score's (SiD, Uni-Instruct: lognormal with EDM's lambda(sigma)), and the
discriminator's BCE logged per band of sigma/alpha."""

import math

import pytest
import torch
from test_fdistill import objective

from distill.core.schedules import sigma_tilde
from distill.engine.config import ConfigError
from distill.objectives import get_objective
from distill.objectives.base import Batch
from distill.objectives.noise_levels import band_names, time_of_sigma_tilde, times_of_u
from teachers import load_teacher


@pytest.fixture(scope="module")
def aniso():
    return load_teacher("gmm:aniso2d")


def karras_u(schedule, t, rho=7.0):
    """The inverse of the Karras map: U[0, 1] exactly when t is a uniform index of the continuous Karras grid."""
    lo, hi = (float(sigma_tilde(schedule, v)) ** (1 / rho) for v in (schedule.t_min, schedule.t_max))
    return (sigma_tilde(schedule, t) ** (1 / rho) - lo) / (hi - lo)


def lognormal_u(schedule, t, mean=-1.2, std=1.2):
    return torch.special.ndtr((sigma_tilde(schedule, t).log() - mean) / std)


def ks_to_uniform(u: torch.Tensor) -> float:
    u, n = u.double().sort().values, len(u)
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    return float(torch.maximum((grid - u).abs(), (u - (grid - 1 / n)).abs()).max())


def ks_bound(n: int) -> float:
    return 1.95 / math.sqrt(n)  # Kolmogorov's 0.1% critical value


@pytest.mark.parametrize("teacher", ["gmm:aniso2d", "mnist16"])
def test_time_of_sigma_tilde_inverts_sigma_tilde(teacher):
    """The time of a noise level has that noise level (the schedule's lambda is log(alpha / sigma), not its square:
    before the fix start_sigma 2.5 fed SiD's generator at 6.25 and Karras sampling drew sigma~^2)."""
    s = load_teacher(teacher).schedule
    sig = torch.tensor([0.05, 0.5, 2.5, 40.0], dtype=torch.float64)
    t = time_of_sigma_tilde(s, sig)
    assert torch.allclose(sigma_tilde(s, t), sig, rtol=1e-6)
    if teacher != "gmm:aniso2d":
        return  # integer timesteps: sigma~ jumps by 2x between the last steps of a 1000-step schedule
    u = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    lo, hi = (float(sigma_tilde(s, v)) ** (1 / 7) for v in (s.t_min, s.t_max))
    want = (lo + u * (hi - lo)) ** 7
    got = sigma_tilde(s, times_of_u(s, u, "karras", 7.0))
    assert torch.allclose(got, want, rtol=1e-6), (got, want)


def test_lognormal_times_follow_the_lognormal_law(aniso):
    s = aniso.schedule
    u = torch.rand(20_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = times_of_u(s, u, "lognormal", lognormal=(-1.2, 1.2))
    assert ks_to_uniform(lognormal_u(s, t)) < ks_bound(len(u))
    assert ks_to_uniform(karras_u(s, t)) > 5 * ks_bound(len(u))  # the test tells the two laws apart
    with pytest.raises(ValueError, match=r"unknown time sampling 'cosine'; allowed: uniform, karras, lognormal"):
        times_of_u(s, u, "cosine")


def _recorded_gan_times(obj, steps=40, size=128):
    """Times at which the critic's and the generator's GAN terms noise real and fake samples."""
    seen, noised = [], obj.noised

    def spy(x, batch, lo_hi, kind=None):
        x_t, t = noised(x, batch, lo_hi, kind)
        if lo_hi is obj.o.gan_t_range:
            seen.append(t)
        return x_t, t

    obj.noised = spy
    nets = {"student": obj.student, "fake_score": obj.fake}
    for step in range(steps):
        batch = Batch(step, torch.Generator().manual_seed(step), torch.device("cpu"), size)
        obj.critic_loss(nets, batch)
        obj.generator_loss(nets, batch)
    return torch.cat(seen)


@pytest.mark.parametrize("name,law", [("dmd2", karras_u), ("fdistill", karras_u), ("sid", lognormal_u), ("uni_instruct", lognormal_u)])
def test_gan_noise_levels_follow_the_reference_distribution(aniso, name, law):
    """With the generator loss uniform in t (as the mnist16 configs), the GAN still sees its method's reference
    distribution of noise levels; before the fix it followed ``time_sampling`` (uniform in t)."""
    torch.manual_seed(0)
    obj = objective(name, aniso, time_sampling="uniform", gan_d_weight=0.01, gan_g_weight=0.001)
    t = _recorded_gan_times(obj)
    assert len(t) == 40 * 3 * 128
    assert ks_to_uniform(law(aniso.schedule, t)) < ks_bound(len(t))
    assert ks_to_uniform((t - aniso.schedule.t_min) / (aniso.schedule.t_max - aniso.schedule.t_min)) > 5 * ks_bound(len(t))


@pytest.mark.parametrize("name", ["sid", "uni_instruct"])
def test_sid_family_fake_score_is_edm_weighted_at_lognormal_noise(aniso, name):
    """SiD's SID_EDMLoss: sigma ~ lognormal(-1.2, 1.2), loss lambda(sigma) ||D_fake - x||^2 with lambda = (s^2 + 0.25) /
    (0.5 s)^2; checked against that formula on the recorded times and the fake score's own x0 error."""
    torch.manual_seed(0)
    rkl = {"divergence": "rkl"} if name == "uni_instruct" else {}  # no GAN: the critic is the fake score alone
    obj = objective(name, aniso, time_sampling="uniform", gan_d_weight=0.0, gan_g_weight=0.0, **rkl)
    o = obj.o
    assert (o.fake_time_sampling, o.fake_loss_space, o.fake_loss_weighting, o.lognormal_mean, o.lognormal_std) == \
        ("lognormal", "x0", "edm", -1.2, 1.2)
    nets = {"student": obj.student, "fake_score": obj.fake}
    batch = Batch(0, torch.Generator().manual_seed(3), torch.device("cpu"), 4096)
    out = obj.critic_loss(nets, batch)
    batch = Batch(0, torch.Generator().manual_seed(3), torch.device("cpu"), 4096)  # the same draws again
    with torch.no_grad():
        x = obj.generate(nets, batch, None)[0]
    t = obj.times(batch, o.fake_t_range, "lognormal")
    eps = batch.randn(x.shape)
    assert ks_to_uniform(lognormal_u(aniso.schedule, t)) < ks_bound(len(t))
    s = sigma_tilde(aniso.schedule, t).float()
    a = aniso.schedule.alpha(t).float()[:, None]
    x_t = a * x + aniso.schedule.sigma(t).float()[:, None] * eps
    with torch.no_grad():
        err = (obj.fake(x_t, t) - x).pow(2).mean(1)
    expected = (s ** 2 + 0.25) / (0.5 * s) ** 2 * err
    assert torch.allclose(out["loss"].detach(), expected, rtol=1e-4, atol=1e-6)


def test_discriminator_bce_is_logged_per_band(aniso):
    """A head whose logits are 0 scores 2 log 2 in every band; the bands partition sigma/alpha."""
    obj = objective("dmd2", aniso, gan_d_weight=0.01)
    with torch.no_grad():
        for p in obj.fake.head.parameters():
            p.zero_()
    out = obj.critic_loss({"student": obj.student, "fake_score": obj.fake},
                          Batch(0, torch.Generator().manual_seed(0), torch.device("cpu"), 512))
    keys = [f"gan_d@{b}" for b in band_names()]
    assert keys == ["gan_d@<0.2", "gan_d@0.2-1", "gan_d@1-5", "gan_d@>=5"] and all(k in out for k in keys)
    assert all(abs(float(out[k]) - 2 * math.log(2)) < 1e-6 for k in keys), {k: float(out[k]) for k in keys}


def test_edm_weighting_needs_the_x0_loss():
    with pytest.raises(ConfigError, match=r"'objective.fake_loss_weighting' is 'edm'.*allowed: fake_loss_space x0"):
        get_objective("sid").Options(fake_loss_space="raw")


def test_logged_means_skip_steps_whose_batch_missed_a_band():
    from distill.engine.run_files import _mean_present

    assert _mean_present([1.0, float("nan"), 3.0]) == 2.0
    assert math.isnan(_mean_present([float("nan")]))
