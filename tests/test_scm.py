"""sCM (issue #35, item 1): the TrigFlow chart of any schedule, the JVP tangent, a loss that vanishes at the exact
consistency function of a Gaussian teacher, the 1- and 2-step sampler, a tiny run that moves one-step samples toward
the exact ODE endpoints, and scripts/distill.py end to end with a bit-identical resume."""

import importlib.util
import math

import pytest
import torch
from distill_helpers import ROOT, run, same_tensors

from distill.core.jvp import jvp
from distill.core.param import append_dims
from distill.core.schedules import SCHEDULES, get_schedule, time_of_trig, trig_scale, trig_time
from distill.engine.config import ConfigError, parse_overrides
from distill.engine.run_config import StudentConfig, load_run_config
from distill.eval.exact import ode_reference
from distill.objectives.base import Batch, Context
from distill.objectives.scm import SCM, SCMOptions, consistency_function, trig_velocity
from students import build_student, load_student
from students.student import Student
from teachers import load_teacher

CONFIG = ROOT / "configs" / "distill" / "scm_ring8.yaml"
TINY = ["student.model.hidden=32", "student.model.layers=1", "batch_size=32", "max_steps=12", "checkpoint_every=4",
        "log_every=2", "objective.warmup_steps=8"]
SD = 0.5


def tiny_cfg(out, *overrides):
    return load_run_config(CONFIG, parse_overrides([*TINY, *overrides, f"output_dir={out}"]))


def mlp_student(teacher, **kw):
    cfg = StudentConfig(arch="mlp", model={"hidden": 16, "layers": 1, "time_scale": 1.0}, prediction_type="v_prediction",
                        parameterization="denoiser", sampler="consistency", **kw)
    return build_student(cfg, teacher)


def _batch(teacher, n, seed=0, step=0):
    x0 = teacher.sample_data(n, torch.Generator().manual_seed(seed))
    return Batch(step, torch.Generator().manual_seed(seed + 1), torch.device("cpu"), n, x0=x0)


def exact_flow(teacher, x, s_from, s_to):
    """The closed-form probability-flow ODE map of the single-Gaussian teacher, per sample (process time)."""
    return torch.cat([teacher.exact_ode_solution(x[i:i + 1], float(s_from[i]), float(s_to[i])) for i in range(len(x))])


def test_the_trigflow_chart_round_trips_on_every_schedule():
    """t = atan2(sigma, alpha sigma_d) inverts, and x_s = trig_scale(s) (cos(t) x0 + sin(t) sigma_d eps) for every schedule."""
    g = torch.Generator().manual_seed(0)
    for kind in SCHEDULES:
        s = get_schedule(kind)
        times = torch.linspace(s.t_min, s.t_max, 9, dtype=torch.float64)
        t = trig_time(s, times, SD)
        assert bool((t >= 0).all() and (t <= math.pi / 2).all() and (t.diff() > 0).all()), kind
        assert torch.allclose(time_of_trig(s, t, SD), times, rtol=1e-9, atol=1e-9 * s.t_max), kind
        x0, eps = torch.randn(9, 3, generator=g, dtype=torch.float64), torch.randn(9, 3, generator=g, dtype=torch.float64)
        x_s = s.alpha(times)[:, None] * x0 + s.sigma(times)[:, None] * eps
        x_t = t.cos()[:, None] * x0 + t.sin()[:, None] * SD * eps
        assert torch.allclose(trig_scale(s, times, SD)[:, None] * x_t, x_s, rtol=1e-9, atol=1e-12), kind


def test_every_schedule_gives_one_trigflow_velocity_the_exact_odes():
    """(cos(t) x_t - D) / sin(t) is one field for VP, EDM and rectified-flow teachers of one law, and on the single Gaussian
    it is the time derivative of the closed-form ODE solution carried into the chart (float64 central difference)."""
    t = torch.tensor([0.1, 0.5, 0.9, 1.3, 1.5], dtype=torch.float64)
    x_t = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fields = [trig_velocity(te.denoise, x_t, t, None, te.schedule, SD)
              for te in map(load_teacher, ("gmm:ring8", "gmm:ring8@edm", "gmm:ring8@rectified_flow"))]
    assert torch.allclose(fields[0], fields[1], atol=1e-8) and torch.allclose(fields[0], fields[2], atol=1e-8)

    teacher = load_teacher("gmm:gauss2d@edm")
    sch, h = teacher.schedule, 1e-5
    s = time_of_trig(sch, t, SD)
    x_s = trig_scale(sch, s, SD)[:, None] * x_t

    def along(dt):
        s2 = time_of_trig(sch, t + dt, SD)
        return exact_flow(teacher, x_s, s, s2) / trig_scale(sch, s2, SD)[:, None]

    fd = (along(h) - along(-h)) / (2 * h)
    assert torch.allclose(trig_velocity(teacher.denoise, x_t, t, None, sch, SD), fd, rtol=1e-6, atol=1e-6)


class Float64Net(torch.nn.Module):
    """A tiny network smooth in x and t, all in float64 (the project's MLP embeds t in float32, too coarse for h = 1e-6)."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = torch.nn.Linear(4, 16).double(), torch.nn.Linear(16, 2).double()

    def forward(self, x, t, class_labels=None):
        t = torch.as_tensor(t, dtype=torch.float64).expand(len(x))
        return self.out(torch.tanh(self.inp(torch.cat([x, t.sin()[:, None], (3 * t).cos()[:, None]], 1))))


def test_the_jvp_tangent_equals_a_float64_finite_difference():
    """df/dt along (dx_t/dt, 1) by forward mode through a tiny student = (f(x + h v, t + h) - f(x - h v, t - h)) / 2h."""
    teacher = load_teacher("gmm:ring8")
    torch.manual_seed(0)
    student = Student(Float64Net(), schedule=teacher.schedule, prediction_type="v_prediction", parameterization="denoiser")
    sch = teacher.schedule
    t = torch.tensor([0.2, 0.7, 1.2, 1.5], dtype=torch.float64)
    x_t = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v = trig_velocity(teacher.denoise, x_t, t, None, sch, SD)

    def f(x_, t_):
        return consistency_function(student, x_, t_, None, sch, SD)

    with torch.no_grad():
        f0, dfdt = jvp(f, (x_t, t), (v, torch.ones_like(t)), method="forward")
        h = 1e-6
        fd = (f(x_t + h * v, t + h) - f(x_t - h * v, t - h)) / (2 * h)
    assert torch.allclose(dfdt, fd, rtol=1e-6, atol=1e-7)
    assert torch.equal(f0, f(x_t, t))
    objective = SCM(SCMOptions(sigma_data=SD), Context(teacher, student))
    g = objective.tangent(f0, dfdt, x_t, v, t, 1.0)  # r = 1: cos(t) df/dt, normalized
    raw = t.cos()[:, None] * fd
    assert torch.allclose(g, raw / (raw.norm(dim=1, keepdim=True) + 0.1), atol=1e-7)


class ExactConsistency(torch.nn.Module):
    """The single Gaussian's exact consistency function, f(x_s, s) = the closed-form ODE solution at clean data; no forward
    mode (float() inside): the objective differentiates it by central differences."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=torch.float64).expand(len(x))
        return exact_flow(self.teacher, x, t, torch.full_like(t, self.teacher.schedule.t_clean))


@pytest.mark.parametrize("velocity", ["teacher", "data"])
def test_the_loss_vanishes_at_the_exact_consistency_function(velocity):
    """With the exact f of gmm:gauss2d, df/dt = 0 along the teacher's ODE: g = 0, the target F- + g is the student's own F
    and ||F - F- - g||^2 ~ 0 (sCD). From data (sCT), g is the single-sample estimate: zero only in expectation."""
    teacher = load_teacher("gmm:gauss2d")
    objective = SCM(SCMOptions(sigma_data=SD, jvp="finite_difference", velocity=velocity), Context(teacher, mlp_student(teacher)))
    exact = {"student": ExactConsistency(teacher)}
    out = objective.loss("student", exact, _batch(teacher, 16))
    if velocity == "teacher":
        assert float(out["sq_error"].max()) < 1e-10 and float(out["loss"].abs().max()) < 1e-10  # w = 0 at initialisation
    else:
        assert float(out["sq_error"].mean()) > 1e-3
    # a student that is the teacher's denoiser (f = D, not a consistency function) is not at the optimum
    out = objective.loss("student", {"student": lambda x, s, c: teacher.denoise(x, s)}, _batch(teacher, 16))
    assert float(out["sq_error"].mean()) > 1e-3


def test_the_weighting_step_sees_the_students_error_and_the_student_sees_w():
    """The two partial gradients of e^w sq - w: the weighting network's loss reuses the student's squared error of the same
    batch (no second teacher call), and the student's loss is scaled by e^w."""
    teacher = load_teacher("gmm:ring8")
    torch.manual_seed(0)
    objective = SCM(SCMOptions(sigma_data=1.0), Context(teacher, mlp_student(teacher)))
    torch.nn.init.constant_(objective.weighting.linear.bias, 0.3)
    nets = {"student": objective.student, "weighting": objective.weighting}
    batch = _batch(teacher, 8)
    student = objective.loss("student", nets, batch)
    weighting = objective.loss("weighting", nets, batch)
    assert torch.allclose(student["loss"], math.exp(0.3) * student["sq_error"] - 0.3, atol=1e-6)
    assert torch.equal(weighting["sq_error"], student["sq_error"]) and weighting["loss"].requires_grad


@pytest.mark.parametrize("spec", ["gmm:ring8", "gmm:ring8@rectified_flow"])
def test_one_and_two_step_sampling(spec):
    """One step: f(x_T, t_max) (TrigFlow pi/2 on a flow schedule); two: re-noise at TrigFlow time 1.1, apply f again."""
    teacher = load_teacher(spec)
    torch.manual_seed(0)
    student = mlp_student(teacher).double()
    SCM(SCMOptions(sigma_data=SD), Context(teacher, student))
    sch = teacher.schedule
    ts = student.sampling_timesteps(2)
    assert float(ts[0]) == sch.t_max and abs(float(trig_time(sch, ts[1:], SD)[0]) - 1.1) < 1e-9
    if spec.endswith("rectified_flow"):
        assert float(trig_time(sch, ts[:1], SD)[0]) == math.pi / 2
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_T = noise * float(sch.init_noise_scale(sch.t_max))
    one = student(x_T, torch.full((8,), sch.t_max, dtype=torch.float64))
    assert torch.allclose(student.sample(noise, steps=1), one, atol=1e-12)
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mid = float(ts[1])
    two = student(float(sch.alpha(mid)) * one + float(sch.sigma(mid)) * z, torch.full((8,), mid, dtype=torch.float64))
    assert torch.allclose(student.sample(noise, steps=2, generator=torch.Generator().manual_seed(2)), two, atol=1e-12)


def test_a_tiny_run_moves_one_step_samples_toward_the_exact_ode_endpoint(tmp_path):
    teacher = load_teacher("gmm:ring8")
    sch = teacher.schedule
    noise = torch.randn(1024, 2, generator=torch.Generator().manual_seed(7))
    end = ode_reference(teacher.denoise, noise.double(), sch.t_max, sch.t_min, sch, steps=100)

    def error(student):
        return float((student.sample(noise, steps=1).double() - end).pow(2).mean().sqrt())

    cfg = tiny_cfg(tmp_path / "r", "student.model.hidden=64", "student.model.layers=2", "batch_size=128", "max_steps=250",
                   "checkpoint_every=1000", "log_every=100", "objective.warmup_steps=100")
    trained = load_student(run(cfg) / "student.safetensors")
    torch.manual_seed(cfg.seed)  # the run's initial weights (distill.engine.run_setup seeds them so)
    initial = build_student(cfg.student, teacher)
    # measured: 0.62 against 1.45 at initialisation (a fresh network's D ~ 0) and 1.43 for one teacher DDIM step
    assert error(trained) < 0.6 * error(initial)


def test_options_are_validated_with_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match="set student.sampler 'consistency' and student.parameterization 'denoiser'"):
        run(tiny_cfg(tmp_path / "a", "student.parameterization=consistency_edm"))
    with pytest.raises(ConfigError, match="'objective.velocity' is 'ode'; allowed: teacher, data"):
        tiny_cfg(tmp_path / "b", "objective.velocity=ode")
    with pytest.raises(ConfigError, match="'objective.mid_time' is 1.57; allowed: TrigFlow times between"):
        run(tiny_cfg(tmp_path / "c", "objective.mid_time=1.57"))
    with pytest.raises(ConfigError, match="objective 'scm' needs real data"):
        run(tiny_cfg(tmp_path / "d", "dataset=null"))
    with pytest.raises(ConfigError, match="'objective.weighting' is 'learned'; allowed: adaptive, uniform"):
        tiny_cfg(tmp_path / "e", "objective.weighting=learned")


def test_distill_script_runs_it_and_a_resumed_run_is_bit_identical(tmp_path):
    spec = importlib.util.spec_from_file_location("distill_cli", ROOT / "scripts" / "distill.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--config", str(CONFIG), "--output-dir", str(tmp_path / "full"), "--set", *TINY]) == 0
    student = load_student(tmp_path / "full" / "student.safetensors")
    assert student.sampler == "consistency" and student.parameterization == "denoiser"
    assert torch.isfinite(student.sample(torch.randn(16, 2), steps=2)).all()
    cfg = load_run_config(CONFIG, parse_overrides([*TINY, f"output_dir={tmp_path / 'killed'}"]))
    assert run(cfg, stop_at=6) is None
    run(cfg, resume="latest")
    for name in ("student.safetensors", "networks.safetensors"):  # the student and the adaptive-weight network
        assert same_tensors(tmp_path / "full" / name, tmp_path / "killed" / name), name


def test_a_teacher_copy_starts_as_the_teachers_denoiser_and_its_jvp_is_forward_mode():
    """On the mnist16 UNet (discrete VP, v-prediction): f = D_theta in the TrigFlow chart equals the teacher's denoiser,
    and the tangent's JVP runs in forward mode through its attention."""
    import warnings

    teacher = load_teacher("mnist16")
    student = build_student(StudentConfig(arch="teacher", parameterization="denoiser", sampler="consistency",
                                          class_conditional=True), teacher)
    SCM(SCMOptions(), Context(teacher, student))
    g = torch.Generator().manual_seed(0)
    x_t, cond = SD * torch.randn(2, 1, 16, 16, generator=g), torch.tensor([3, 7])
    t = torch.tensor([1.3, 0.4], dtype=torch.float64)
    sch = teacher.schedule
    with torch.no_grad():
        s = time_of_trig(sch, t, SD)
        x_s = append_dims(trig_scale(sch, s, SD), 4).float() * x_t
        f = consistency_function(student, x_t, t, cond, sch, SD)
        assert torch.allclose(f, teacher.denoise(x_s, s, cond), atol=1e-5)
        v = trig_velocity(teacher.denoise, x_t, t, cond, sch, SD)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback to central differences
            _, dfdt = jvp(lambda x_, t_: consistency_function(student, x_, t_, cond, sch, SD), (x_t, t),
                          (v, torch.ones_like(t)), method="forward")
    assert torch.isfinite(dfdt).all() and dfdt.shape == x_t.shape


@pytest.mark.parametrize("t_value", [0.3, 0.9, 1.3])
def test_the_student_gradient_is_the_continuous_consistency_gradient(t_value):
    """Lu & Song 2024, Sec. 3 / Song et al. 2023, Remark 4: as dt -> 0 the gradient of the discrete consistency loss
    ||f_theta(x_t, t) - f-(x_{t-dt}, t-dt)||^2 / (D dt), x_{t-dt} the teacher's exact ODE map of x_t, tends to
    (2 / D) df-/dt . grad f_theta. sCM's loss ||F_theta - F- - g||^2 / D with g = cos(t) df-/dt / (||g|| + c) (r = 1) has
    the gradient (2 / D) g . grad f_theta / (sigma_d sin t), i.e. that limit times cos(t) / (sigma_d sin(t) (||g|| + c)).
    Checked on one sample at a fixed t against the discrete loss at dt = 3e-5 (the schedule's time maps round in float32
    somewhere below: the discrepancy falls as dt shrinks to ~1e-5, then grows), to 0.1% of the largest component."""
    teacher = load_teacher("gmm:gauss2d")
    torch.manual_seed(0)
    student = mlp_student(teacher).double()
    options = SCMOptions(sigma_data=SD, jvp="forward", velocity="teacher", weighting="uniform", tangent_c=0.1)
    objective = SCM(options, Context(teacher, student))
    t = torch.tensor([t_value], dtype=torch.float64)
    objective.sample_times = lambda batch, size: t  # noqa: ARG005  (a fixed time; z is then the batch's first draw)
    batch = _batch(teacher, 1, seed=3)
    batch.x0 = batch.x0.double()
    z = SD * _batch(teacher, 1, seed=3).randn(batch.x0.shape, torch.float64)
    x_t = t.cos() * batch.x0 + t.sin() * z
    params = [p for p in student.parameters() if p.requires_grad]

    student.zero_grad()
    objective.loss("student", {"student": student}, batch)["loss"].sum().backward()
    grad_scm = torch.cat([p.grad.flatten() for p in params])

    def f(x, tt):
        return consistency_function(student, x, tt, None, teacher.schedule, SD)

    dt = 3e-5
    s_from, s_to = (time_of_trig(teacher.schedule, u, SD) for u in (t, t - dt))
    x_s = append_dims(trig_scale(teacher.schedule, s_from, SD), 2).to(x_t) * x_t
    x_back = exact_flow(teacher, x_s, s_from, s_to) / append_dims(trig_scale(teacher.schedule, s_to, SD), 2).to(x_t)
    with torch.no_grad():
        target = f(x_back, t - dt)
        dfdt = (f(x_t, t) - target) / dt  # df-/dt along the teacher's ODE
    student.zero_grad()
    ((f(x_t, t) - target).pow(2).mean() / dt).backward()
    grad_discrete = torch.cat([p.grad.flatten() for p in params])

    g = t.cos() * dfdt
    scale = float(t.cos() / (SD * t.sin() * (g.norm() + options.tangent_c)))
    assert grad_scm.norm() > 0
    error = float((grad_scm - scale * grad_discrete).abs().max() / grad_scm.abs().max())
    assert error < 1e-3, error  # a wrong factor (cos t, sigma_d sin t, the normalization) is an O(1) error
