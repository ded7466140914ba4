"""The adversarial head any objective adds by configuration, and GDD's pure-GAN mode (distill/objectives/adversarial.py)."""

import pytest
import torch
from distill_helpers import RING8, ROOT, run, same_tensors, tensors, tiny_cfg
from test_engine import _metrics, _toy_teacher

from distill.engine.config import ConfigError
from distill.engine.run_config import StudentConfig
from distill.objectives.adversarial import AdversarialHead, AdversarialOptions
from distill.objectives.base import Batch, Context
from students import build_student, load_student
from teachers import load_teacher

CONFIGS = ROOT / "configs" / "distill"


def _student(teacher, **kw):
    cfg = StudentConfig(arch="mlp", model={"hidden": 16, "layers": 1, "time_scale": 1.0}, **kw)
    return build_student(cfg, teacher).double()


@pytest.mark.parametrize("form", [{"sampler": "consistency", "parameterization": "consistency_edm"},
                                  {"sampler": "ode", "parameterization": "denoiser"},
                                  {"sampler": "meanflow", "parameterization": "denoiser", "prediction_type": "flow"}])
def test_the_generators_one_call_is_the_students_one_step_sample(form):
    teacher = load_teacher("gmm:ring8")
    torch.manual_seed(0)
    student = _student(teacher, **form)
    if form["sampler"] == "meanflow":
        student.add_condition("interval", scale=1.0)
        torch.nn.init.normal_(student.conditions["interval"].proj.weight)  # the interval input matters
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x, t, extra = student.first_step(noise)
    assert torch.allclose(student(x, t, None, **extra), student.sample(noise, steps=1), atol=1e-12)
    assert set(extra) == ({"interval"} if form["sampler"] == "meanflow" else set())


def _head(tmp_path, features="teacher", **kw):
    teacher = load_teacher(str(_toy_teacher(tmp_path)))
    torch.manual_seed(0)
    student = _student(teacher, sampler="consistency", parameterization="consistency_edm").float()
    head = AdversarialHead(AdversarialOptions(features=features, **kw), Context(teacher, student))
    return teacher, student, head


def _batch(step=0, n=32):
    return Batch(step, torch.Generator().manual_seed(step), torch.device("cpu"), n,
                 x0=torch.randn(n, 2, generator=torch.Generator().manual_seed(100 + step)) + 2.0)


@pytest.mark.parametrize("features", ["teacher", "fake_score"])
def test_each_loss_reaches_only_its_own_network(tmp_path, features):
    teacher, student, head = _head(tmp_path, features)
    nets = {"student": student, "discriminator": head.module}
    owned = {"student": list(student.parameters()), "discriminator": list(head.module.parameters()),
             "teacher": list(teacher.model.parameters())}

    def grads(loss):
        for ps in owned.values():
            for p in ps:
                p.grad = None
        loss.mean().backward()
        return {k: any(p.grad is not None and p.grad.abs().sum() > 0 for p in ps) for k, ps in owned.items()}

    out = head.discriminator_loss(nets, _batch())
    assert grads(out["loss"]) == {"student": False, "discriminator": True, "teacher": False}
    assert ("fake_score" in out) == (features == "fake_score")
    assert grads(head.generator_term(nets, _batch(1), None)) == {"student": True, "discriminator": True, "teacher": False}
    # with the teacher's features the head reads the frozen teacher: another teacher, other logits
    x, t = torch.randn(8, 2), torch.full((8,), 500.0, dtype=torch.float64)
    before = head.module(x, t)[1].detach()
    with torch.no_grad():
        for p in teacher.model.parameters():
            p.add_(0.5)
    assert torch.equal(before, head.module(x, t)[1].detach()) == (features == "fake_score")


def test_the_discriminator_loss_is_the_bce_of_its_logits_and_r1_is_the_input_gradient(tmp_path):
    _, student, head = _head(tmp_path, r1_gamma=2.0)
    nets = {"student": student, "discriminator": head.module}
    batch = _batch(3)
    out = head.discriminator_loss(nets, batch)
    # the same draws, replayed: the BCE from the logits the module gives, and R1 from autograd by hand
    replay = _batch(3)
    with torch.no_grad():
        x = head.generate(student, replay, None)
    real_t, t_r = head.noised(replay.x0, replay)
    fake_t, t_f = head.noised(x, replay)
    real_t.requires_grad_(True)
    l_real, l_fake = head.module(real_t, t_r)[1], head.module(fake_t, t_f)[1]
    (g,) = torch.autograd.grad(l_real.sum(), real_t)
    bce = torch.nn.functional.softplus(-l_real) + torch.nn.functional.softplus(l_fake)
    assert torch.allclose(out["loss"], bce + 1.0 * g.pow(2).sum(1), atol=1e-5)
    assert torch.allclose(out["r1"], g.pow(2).sum(1).mean(), atol=1e-5)


def test_a_gdd_run_moves_one_step_samples_toward_the_data(tmp_path):
    """GDD on a toy teacher: the one-step samples' mean and spread move toward the ring's (radius 2 around 0) from a
    student that starts near 0. The head reads a trained copy of the teacher (features fake_score, no denoising term):
    a random 16-wide toy network's frozen features barely separate 2-D points (0.97x the initial gap at 200 steps)."""
    teacher = _toy_teacher(tmp_path)
    cfg = tiny_cfg(tmp_path / "gdd", f"teacher={teacher}", "student.model.hidden=32", "batch_size=128", "max_steps=300",
                   "objective={name: gdd, features: fake_score, fake_score_weight: 0.0, time_sampling: uniform, t_range: [0.0, 0.05]}",
                   "networks.discriminator.lr=0.01", "checkpoint_every=1000", "log_every=50", "optim.lr=0.003",
                   "ema_decay=null", "grad_clip=null")
    trained = load_student(run(cfg) / "student.safetensors")
    torch.manual_seed(cfg.seed)
    initial = build_student(cfg.student, load_teacher(str(teacher)))
    data = load_teacher("gmm:ring8").sample_data(4096, generator=torch.Generator().manual_seed(0)).float()
    noise = torch.randn(4096, 2, generator=torch.Generator().manual_seed(5))

    def gap(student):  # distance of the first two moments to the data's
        with torch.no_grad():
            x = student.sample(noise, steps=1).float()
        return float((x.mean(0) - data.mean(0)).norm() + (x.pow(2).sum(1).mean().sqrt() - data.pow(2).sum(1).mean().sqrt()).abs())

    assert gap(trained) < 0.7 * gap(initial), (gap(trained), gap(initial))  # 0.64x at 200 steps when written
    names = set(_metrics(tmp_path / "gdd")[-1]) | set(_metrics(tmp_path / "gdd")[-2])
    assert {"gan_g", "gan_d", "real_logit"} <= names, names


def test_adversarial_on_consistency_distillation_resumes_bit_identically(tmp_path):
    teacher = _toy_teacher(tmp_path)
    sets = [f"teacher={teacher}", "adversarial={g_weight: 0.1, start_step: 2, features: fake_score}", "max_steps=8"]
    run(tiny_cfg(tmp_path / "full", *sets))
    cfg = tiny_cfg(tmp_path / "killed", *sets)
    assert run(cfg, stop_at=4) is None
    run(cfg, resume="latest")
    for name in ("student.safetensors", "networks.safetensors"):
        assert same_tensors(tmp_path / "full" / name, tmp_path / "killed" / name), name
    assert any(k.startswith("discriminator.") for k in tensors(tmp_path / "full" / "networks.safetensors"))
    rows = _metrics(tmp_path / "full")
    student = [r for r in rows if r["network"] == "student"]
    assert "gan_g" not in student[0] and "gan_g" in student[-1]  # L_G from start_step on (logged every 2 steps)
    assert any("fake_score" in r for r in rows if r["network"] == "discriminator")


@pytest.mark.parametrize("sets,message", [
    (["objective={name: dmd2}", "adversarial={features: fake_score}"], r"objective 'dmd2' trains its own fake score.*"
                                                                       r"or features fake_score with fake_score_weight 0"),
    (["adversarial={time_sampling: cosine}"], r"'adversarial.time_sampling' is 'cosine'; allowed: uniform, karras, lognormal"),
    (["adversarial={g_weigth: 1}"], r"unknown config key\(s\) adversarial.g_weigth"),
    (["adversarial={t_range: [0.5, 0.1]}"], r"'adversarial.t_range' is \[0.5, 0.1\]"),
])
def test_bad_settings_are_refused_with_one_sentence(tmp_path, sets, message):
    teacher = _toy_teacher(tmp_path)
    with pytest.raises(ConfigError, match=message):
        run(tiny_cfg(tmp_path / "r", f"teacher={teacher}", *sets))


def test_an_analytic_teacher_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"adversarial reads a network's features, but 'gmm:ring8' is analytic"):
        run(tiny_cfg(tmp_path / "r", "adversarial={}", config=RING8))


def test_an_objective_on_a_trajectory_cache_is_refused(tmp_path):
    from distill.objectives.adversarial import Adversarial
    from distill.objectives.base import Objective

    class OnCache(Objective):
        name, needs = "on_cache", frozenset({"trajectories"})

        def networks(self):
            return []

    teacher, student, _ = _head(tmp_path)
    with pytest.raises(ConfigError, match=r"objective 'on_cache' reads a trajectory cache whose labels the data's would replace"):
        Adversarial(OnCache(None, Context(teacher, student)), AdversarialOptions(), Context(teacher, student))


def test_two_processes_train_with_the_head(tmp_path):
    """Under DDP (two CPU ranks, gloo) the student is called twice a step (the objective's loss and L_G) and the
    discriminator is its own prepared network: the run ends with the student and the discriminator saved."""
    from test_engine import _launch2

    teacher = _toy_teacher(tmp_path)
    done = _launch2(tmp_path / "two", f"teacher={teacher}", "adversarial={g_weight: 0.1, features: fake_score}",
                    "max_steps=4", port=29563)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "two" / "student.safetensors").is_file()
    assert any(k.startswith("discriminator.") for k in tensors(tmp_path / "two" / "networks.safetensors"))


def test_a_distribution_matching_objective_takes_a_separate_discriminator_network(tmp_path):
    """``features: fake_score`` with ``fake_score_weight: 0`` beside an objective that trains its own fake score: a
    second network (a trainable teacher copy trained by the BCE alone), not a second fake score; both are saved."""
    teacher = _toy_teacher(tmp_path)
    sets = [f"teacher={teacher}", "objective={name: dmd2, critic_steps: 1, gan_g_weight: 0.0, gan_d_weight: 0.0}",
            "adversarial={g_weight: 0.1, features: fake_score, fake_score_weight: 0.0}", "max_steps=4"]
    run(tiny_cfg(tmp_path / "r", *sets))
    saved = tensors(tmp_path / "r" / "networks.safetensors")
    assert any(k.startswith("discriminator.") for k in saved) and any(k.startswith("fake_score.") for k in saved)
    rows = _metrics(tmp_path / "r")
    assert any("gan_d" in r for r in rows if r["network"] == "discriminator")
