"""Distribution matching (vsd, dmd, dmd2, sid) on analytic teachers: gradients against their formulas with exact
scores, convergence of a linear generator to gmm:gauss2d, option checks, bit-identical resume, two processes."""

import math
import subprocess
import sys

import pytest
import torch
from distill_helpers import ROOT, run, same_tensors, subprocess_env, tiny_cfg

from distill.engine.config import ConfigError, from_dict
from distill.engine.run_config import StudentConfig
from distill.objectives import get_objective
from distill.objectives.base import Batch, Context
from distill.objectives.distribution_matching import times_of_u
from students import build_student
from teachers import load_teacher
from teachers.gmm import GaussianMixtureTeacher

OBJECTIVES = ("vsd", "dmd", "dmd2", "sid")


# -- a Gaussian generator x = mu + L z and its exact fake score ----------------------------------------------
class LinearGenerator(torch.nn.Module):
    def __init__(self, mu, chol):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.tensor(mu, dtype=torch.float64))
        self.chol = torch.nn.Parameter(torch.tensor(chol, dtype=torch.float64))

    def forward(self, x, t=None, cond=None):
        return self.mu + x.double() @ self.chol.T

    def law(self, schedule):
        """The generator's own distribution N(mu, L L^T) as an analytic teacher: its exact denoiser is the fake score."""
        cov = (self.chol @ self.chol.T).detach() + 1e-12 * torch.eye(2, dtype=torch.float64)
        return GaussianMixtureTeacher([1.0], self.mu.detach()[None], cov[None], schedule)


class ExactFake(torch.nn.Module):
    """D_fake = the exact denoiser of the generator's current law (differentiable in x, not in the parameters)."""

    def __init__(self, generator, schedule):
        super().__init__()
        self.g, self.schedule = [generator], schedule

    def forward(self, x, t, cond=None, **kw):
        return self.g[0].law(self.schedule).denoise(x, t)


def objective(name, teacher, **options):
    student = build_student(StudentConfig(arch="mlp", model={"hidden": 8, "layers": 1}, parameterization="denoiser"), teacher)
    cls = get_objective(name)
    return cls(from_dict(cls.Options, {"fake_hidden": 8, "fake_layers": 1, **options}, "objective."),
               Context(teacher=teacher, student=student))


def linear_map(teacher_like, t):
    """D(x_t) = A x_t + b of a single Gaussian N(mu, S): A = alpha S (alpha^2 S + sigma^2 I)^-1, b = mu - A alpha mu."""
    s, a, sig = teacher_like.covs[0], float(teacher_like.schedule.alpha(t)), float(teacher_like.schedule.sigma(t))
    A = a * s @ torch.linalg.inv(a * a * s + sig * sig * torch.eye(2, dtype=torch.float64))
    return A, teacher_like.means[0] - a * A @ teacher_like.means[0]


def gaussian_kl(m1, c1, m2, c2):
    """KL(N(m1, c1) || N(m2, c2))."""
    inv = torch.linalg.inv(c2)
    d = m2 - m1
    return 0.5 * (torch.trace(inv @ c1) + d @ inv @ d - 2 + torch.logdet(c2) - torch.logdet(c1))


@pytest.fixture(scope="module")
def gauss():
    return load_teacher("gmm:gauss2d")


def _samples(gen, schedule, t, n, seed):
    g = torch.Generator().manual_seed(seed)
    z, eps = torch.randn(n, 2, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g, dtype=torch.float64)
    x = gen(z)
    a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
    return z, x, a * x + s * eps, torch.full((n,), float(t), dtype=torch.float64)


def _grads(loss, gen):
    gen.zero_grad()
    loss.backward()
    return gen.mu.grad.clone(), gen.chol.grad.clone()


# -- gradients equal their formulas ---------------------------------------------------------------------------
def test_vsd_gradient_in_score_space_is_the_gradient_of_kl_between_the_noised_laws(gauss):
    """c(t) = alpha^2 / sigma^2: E[c (D_fake - D_real)(x_t) dx/dtheta] = grad_theta KL(q_t || p_t) (VSD, Wang et al.
    2023, Eq. 9; DMD, Yin et al. 2024, Eq. 7), both laws Gaussian so the KL is in closed form."""
    schedule, t = gauss.schedule, 0.4
    gen = LinearGenerator([-0.6, 0.9], [[0.5, 0.0], [0.3, 0.4]])
    obj = objective("vsd", gauss, weighting="snr")
    _, x, x_t, tt = _samples(gen, schedule, t, 400_000, 0)
    dm = obj.matching_loss(x, x_t, tt, None, {"fake_score": ExactFake(gen, schedule)})["dm"]
    g_mu, g_chol = _grads(dm.mean() * 2, gen)  # gradient_form averages over the d = 2 coordinates
    a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
    mu, chol = gen.mu.detach().clone().requires_grad_(), gen.chol.detach().clone().requires_grad_()
    eye = torch.eye(2, dtype=torch.float64)
    kl = gaussian_kl(a * mu, a * a * chol @ chol.T + s * s * eye, a * gauss.means[0], a * a * gauss.covs[0] + s * s * eye)
    e_mu, e_chol = torch.autograd.grad(kl, (mu, chol))
    assert torch.allclose(g_mu, e_mu, rtol=0.02, atol=2e-3 * e_mu.abs().max())
    assert torch.allclose(g_chol, e_chol, rtol=0.05, atol=0.02 * e_chol.abs().max())


@pytest.mark.parametrize("weighting", ["uniform", "eps"])
def test_vsd_weightings_scale_the_same_direction(gauss, weighting):
    schedule, t = gauss.schedule, 0.3
    gen = LinearGenerator([-0.6, 0.9], [[0.5, 0.0], [0.3, 0.4]])
    z, x, x_t, tt = _samples(gen, schedule, t, 1000, 1)
    fake = ExactFake(gen, schedule)
    dm = objective("vsd", gauss, weighting=weighting).matching_loss(x, x_t, tt, None, {"fake_score": fake})["dm"]
    g_mu, _ = _grads(dm.sum(), gen)
    a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
    c = {"uniform": 1.0, "eps": a / s}[weighting]
    with torch.no_grad():
        g = c * (fake(x_t, tt) - gauss.denoise(x_t, tt))
    assert torch.allclose(g_mu, g.sum(0) / 2, rtol=1e-10, atol=1e-12)


def test_dmd_gradient_is_the_normalised_score_difference(gauss):
    """grad_x = (D_fake - D_real) / mean_d |x - D_real| per sample (DMD, Yin et al. 2024, Eq. 7-8)."""
    schedule, t = gauss.schedule, 0.5
    gen = LinearGenerator([1.0, 0.2], [[0.3, 0.0], [-0.2, 0.6]])
    z, x, x_t, tt = _samples(gen, schedule, t, 512, 2)
    fake = ExactFake(gen, schedule)
    terms = objective("dmd", gauss, regression_weight=0.0).matching_loss(x, x_t, tt, None, {"fake_score": fake})
    g_mu, g_chol = _grads(terms["dm"].sum(), gen)
    with torch.no_grad():
        d_real = gauss.denoise(x_t, tt)
        w = (x - d_real).abs().mean(1, keepdim=True)
        g = (fake(x_t, tt) - d_real) / w / 2
    assert torch.allclose(g_mu, g.sum(0), rtol=1e-10)
    assert torch.allclose(g_chol, g.T @ z, rtol=1e-10)
    assert torch.allclose(terms["normaliser"], w.flatten())


@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_sid_gradient_matches_its_formula_through_both_frozen_denoisers(gauss, alpha):
    """SiD (Zhou et al. 2024, Eq. 23): L = [(1 - a)|delta|^2 + delta.(D_fake - x)] / w with delta = D_real - D_fake, both
    linear in x_t here (D = A x_t + b), so dL/dx = [2(1 - a) alpha_t M^T delta + alpha_t M^T e + (alpha_t A_f - I)^T delta] / w,
    M = A_real - A_fake, e = D_fake - x (w held fixed)."""
    schedule, t = gauss.schedule, 0.35
    gen = LinearGenerator([0.2, -0.8], [[0.7, 0.0], [0.1, 0.2]])
    z, x, x_t, tt = _samples(gen, schedule, t, 256, 3)
    x = x.detach().requires_grad_()
    x_t = float(schedule.alpha(t)) * x + (x_t - float(schedule.alpha(t)) * x.detach())
    fake = ExactFake(gen, schedule)
    dm = objective("sid", gauss, alpha=alpha).matching_loss(x, x_t, tt, None, {"fake_score": fake})["dm"]
    (grad,) = torch.autograd.grad(dm.sum(), x)
    a_r, b_r = linear_map(gauss, t)
    a_f, b_f = linear_map(gen.law(schedule), t)
    at = float(schedule.alpha(t))
    with torch.no_grad():
        d_real, d_fake = x_t @ a_r.T + b_r, x_t @ a_f.T + b_f
        delta, e, m = d_real - d_fake, d_fake - x, a_r - a_f
        w = (x - d_real).abs().mean(1, keepdim=True)
        expected = (2 * (1 - alpha) * at * delta @ m + at * e @ m + delta @ (at * a_f - torch.eye(2, dtype=torch.float64))) / w / 2
    assert torch.allclose(grad, expected, rtol=1e-8, atol=1e-10)


def test_sid_loss_vanishes_in_expectation_with_the_exact_fake_score_at_alpha_one(gauss):
    """Tweedie: D_fake(x_t) = E[x | x_t], so E[delta . (D_fake - x)] = 0 (the score identity SiD rests on)."""
    schedule, t = gauss.schedule, 0.5
    gen = LinearGenerator([0.2, -0.8], [[0.7, 0.0], [0.1, 0.2]])
    _, x, x_t, tt = _samples(gen, schedule, t, 400_000, 4)
    fake = ExactFake(gen, schedule)
    with torch.no_grad():
        delta = gauss.denoise(x_t, tt) - fake(x_t, tt)
        value = (delta * (fake(x_t, tt) - x)).sum(1)
        scale = delta.pow(2).sum(1).mean()
    assert abs(float(value.mean())) < 0.01 * float(scale)


# -- a one-step linear generator converges to gmm:gauss2d ------------------------------------------------------
@pytest.mark.parametrize("name,options,steps", [
    ("vsd", {"weighting": "snr", "time_sampling": "uniform", "t_range": [0.05, 0.95]}, 400),
    ("dmd", {"regression_weight": 0.0}, 400),
    ("sid", {"start_sigma": None, "alpha": 0.5}, 400),
    ("sid", {"start_sigma": None, "alpha": 1.2}, 400),  # the paper's alpha (it diverged while Karras sampling drew sigma^2)
])
def test_linear_generator_converges_to_the_exact_gaussian(gauss, name, options, steps):
    schedule = gauss.schedule
    gen = LinearGenerator([-1.0, 1.0], [[0.3, 0.0], [0.0, 0.3]])
    obj = objective(name, gauss, **options)
    nets = {"student": gen, "fake_score": ExactFake(gen, schedule)}
    opt = torch.optim.Adam(gen.parameters(), lr=0.02)
    for step in range(steps):
        batch = Batch(step, torch.Generator().manual_seed(step), torch.device("cpu"), 512)
        opt.zero_grad()
        obj.generator_loss(nets, batch)["loss"].mean().backward()
        opt.step()
    mean, cov = gen.mu.detach(), (gen.chol @ gen.chol.T).detach()
    assert torch.allclose(mean, gauss.means[0], atol=0.03), (mean, gauss.means[0])
    assert torch.allclose(cov, gauss.covs[0], atol=0.04), (cov, gauss.covs[0])


# -- options -----------------------------------------------------------------------------------------------
def test_defaults_are_the_papers():
    o = {n: get_objective(n).Options() for n in OBJECTIVES}
    assert (o["dmd"].regression_weight, o["dmd"].t_range, o["dmd"].critic_steps) == (0.25, [0.02, 0.98], 1)
    assert (o["dmd2"].critic_steps, o["dmd2"].gan_g_weight, o["dmd2"].gan_d_weight) == (5, 3e-3, 1e-2)
    assert (o["sid"].alpha, o["sid"].start_sigma, o["sid"].t_range, o["sid"].gan_g_weight) == (1.2, 2.5, [0.0, 0.8], 0.0)
    assert o["vsd"].weighting == "uniform" and not hasattr(o["vsd"], "gan_g_weight")


@pytest.mark.parametrize("name,options,message", [
    ("vsd", {"t_range": [0.5, 0.2]}, r"'objective.t_range' is \[0.5, 0.2\]; allowed: \[lo, hi\] with 0 <= lo <= hi <= 1"),
    ("vsd", {"weighting": "sqrt"}, r"'objective.weighting' is 'sqrt'; allowed: uniform, snr, eps"),
    ("dmd2", {"gan_t_range": [0, 2]}, r"'objective.gan_t_range' is \[0, 2\]; allowed"),
    ("sid", {"fake_score": "teacher_copy"}, r"no network to copy"),
    ("sid", {"gan_features": "teacher"}, r"'objective.gan_features' is 'teacher' but 'gmm:ring8' is analytic"),
    ("dmd", {}, r"regression_weight > 0 needs .* set config key 'trajectories'"),
    ("dmd2", {"guidance_scale": 2.0}, r"'objective.guidance_scale' needs a class-conditional teacher"),
    ("dmd2", {"generator_steps": 5}, r"'objective.generator_steps' must be at most 4"),
    ("sid", {"generator_steps": 2, "start_sigma": 0.001}, r"'objective.start_sigma' \(0.001\) puts the first generator time"),
])
def test_bad_options_are_refused_in_one_sentence(tmp_path, name, options, message):
    sets = [f"objective.{k}={v}" for k, v in options.items()]
    with pytest.raises((ConfigError, ValueError), match=message):
        run(tiny_cfg(tmp_path / "r", *_dm(name), *sets, "objective.regression_weight=0.25" if name == "dmd" else "max_steps=1"))


def test_karras_times_cover_the_schedule_in_order():
    s = load_teacher("gmm:ring8").schedule
    t = times_of_u(s, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), "karras", 7.0)
    assert t[0] == pytest.approx(s.t_min) and t[2] == pytest.approx(s.t_max) and t[0] < t[1] < t[2]
    assert math.isclose(float(times_of_u(s, torch.tensor([0.5], dtype=torch.float64), "uniform", 7.0)), (s.t_min + s.t_max) / 2)


# -- through the trainer: resume and two processes ------------------------------------------------------------
def _dm(name):
    sets = [f"objective={{name: {name}}}", "objective.fake_hidden=16", "objective.fake_layers=1", "student.parameterization=denoiser",
            "objective.generator_start_step=1"]
    if name == "dmd":
        sets.append("objective.regression_weight=0.0")
    if name in ("dmd2", "sid"):
        sets += ["objective.critic_steps=2", "objective.gan_g_weight=0.01", "objective.gan_d_weight=0.01", "objective.gan_start_step=3",
                 "objective.head_hidden=8"]
    return sets


@pytest.fixture(scope="module")
def ring_cache(tmp_path_factory):
    from distill.engine.trajectories import generate

    out = tmp_path_factory.mktemp("cache") / "traj"
    generate(load_teacher("gmm:ring8"), out, solver="euler", nfe=4, num_samples=64, shard_size=64, log=lambda m: None)
    return out


def _resume_cfg(tmp_path, name, folder, cache):
    extra = [f"trajectories={cache}", "objective.regression_weight=0.25"] if name == "dmd" else []
    return tiny_cfg(tmp_path / folder, *_dm(name), *extra, "max_steps=8", "checkpoint_every=3", "log_every=1")


@pytest.mark.parametrize("name", OBJECTIVES)
def test_objective_resumes_bit_identically(tmp_path, name, ring_cache):
    run(_resume_cfg(tmp_path, name, "full", ring_cache))
    assert run(_resume_cfg(tmp_path, name, "part", ring_cache), stop_at=4) is None
    run(_resume_cfg(tmp_path, name, "part", ring_cache), resume="latest")
    for f in ("student.safetensors", "student_ema.safetensors", "networks.safetensors"):
        assert same_tensors(tmp_path / "full" / f, tmp_path / "part" / f), f
    import json

    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    student = [r for r in rows if r["network"] == "student"]
    critic = [r for r in rows if r["network"] == "fake_score"]
    assert student and "dm" in student[-1] and "fake_score" in critic[-1]
    if name in ("dmd2", "sid"):
        assert "gan_g" in student[-1] and {"gan_d", "real_logit", "fake_logit"} <= set(critic[-1])
        assert [r["step"] for r in student] == [2, 4, 6, 8]  # critic_steps 2: the generator on every other step
    if name == "dmd":
        assert "regression" in student[-1] and "normaliser" in student[-1]


def test_dmd2_on_a_network_teacher_copies_it_and_puts_the_head_on_its_bottleneck(tmp_path):
    from conftest import save_teacher_folder
    from diffusers import DDPMScheduler

    from teachers.toy_mlp import ToyMLP

    torch.manual_seed(0)
    folder = save_teacher_folder(tmp_path / "toy", ToyMLP(dim=2, hidden=16, layers=1), DDPMScheduler(clip_sample=False))
    cfg = tiny_cfg(tmp_path / "r", f"teacher={folder}", *_dm("dmd2"), "objective.time_sampling=uniform", "max_steps=4")
    run(cfg)
    from distill_helpers import tensors

    others = tensors(tmp_path / "r" / "networks.safetensors")
    assert any(k.startswith("fake_score.score.net.mlp.") for k in others) and any(k.startswith("fake_score.head.") for k in others)


def _launch2(out, *sets, port):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(ROOT / "scripts" / "distill.py"), "--config", str(ROOT / "configs" / "distill" / "cd_ring8.yaml"),
           "--output-dir", str(out), "--set", "student.model.hidden=32", "student.model.layers=1", "batch_size=32",
           "checkpoint_every=4", "log_every=2", "max_steps=6", *sets]
    return subprocess.run(cmd, env={**subprocess_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name,port", [("vsd", 29561), ("dmd", 29563), ("dmd2", 29565), ("sid", 29567)])
def test_objective_runs_on_two_processes(tmp_path, name, port):
    done = _launch2(tmp_path / "two", *_dm(name), port=port)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "two" / "student.safetensors").is_file()


def test_guided_teacher_is_the_real_score(tmp_path):
    """guidance_scale w: D_real = D(x, none) + w (D(x, c) - D(x, none)) (Ho & Salimans 2022) inside the generator loss."""
    teacher = load_teacher("gmm:ring8")
    student = build_student(StudentConfig(arch="mlp", model={"hidden": 8, "layers": 1}, class_conditional=True), teacher)
    cls = get_objective("dmd2")
    obj = cls(from_dict(cls.Options, {"guidance_scale": 2.0, "fake_hidden": 8}, "objective."), Context(teacher=teacher, student=student))
    x, t, c = torch.randn(16, 2), torch.full((16,), 0.5, dtype=torch.float64), torch.arange(16) % 8
    uncond = teacher.denoise(x, t, torch.full_like(c, -1))
    assert torch.allclose(obj.real(x, t, c), uncond + 2.0 * (teacher.denoise(x, t, c) - uncond), atol=1e-6)
    run(tiny_cfg(tmp_path / "g", *_dm("dmd2"), "objective.guidance_scale=2.0", "student.class_conditional=true", "max_steps=4"))


@pytest.mark.parametrize("source", ["backward", "data"])
def test_multistep_generator_records_its_times(tmp_path, source):
    run(tiny_cfg(tmp_path / "m", *_dm("sid"), "objective.generator_steps=3", f"objective.multistep_input={source}",
                 "objective.start_sigma=null", "max_steps=6"))
    student = __import__("students").load_student(tmp_path / "m" / "student.safetensors")
    times = [student.sampling_timesteps(k).tolist() for k in (1, 2, 3)]
    assert times[2][:2] == times[1] and times[1][:1] == times[0] and times[0] == [1.0]
