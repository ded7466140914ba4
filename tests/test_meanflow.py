"""MeanFlow (issue #35, item 2): the loss is zero at the exact average velocity of an analytic teacher, the flow chart
makes every schedule's ODE the rectified flow's, the sampler takes z_r = z_t - (t - r) u, a tiny run moves the one-step
samples toward the exact ODE endpoints, and scripts/distill.py runs it end to end and resumes bit-identically."""

import importlib.util

import pytest
import torch
from distill_helpers import ROOT, run, same_tensors

from distill.core.param import append_dims
from distill.core.schedules import SCHEDULES, flow_time, get_schedule, time_of_flow
from distill.engine.config import ConfigError, parse_overrides
from distill.engine.run_config import StudentConfig, load_run_config
from distill.eval.exact import ode_reference
from distill.objectives.base import Batch, Context
from distill.objectives.meanflow import MeanFlow, MeanFlowOptions, average_velocity, teacher_velocity
from students import build_student, load_student
from teachers import load_teacher

CONFIG = ROOT / "configs" / "distill" / "meanflow_ring8.yaml"
TINY = ["student.model.hidden=32", "student.model.layers=1", "batch_size=32", "max_steps=12", "checkpoint_every=4",
        "log_every=2"]
RING = "gmm:ring8@rectified_flow"


def tiny_cfg(out, *overrides):
    return load_run_config(CONFIG, parse_overrides([*TINY, *overrides, f"output_dir={out}"]))


def flow_student(teacher, **kw):
    cfg = StudentConfig(arch="mlp", model={"hidden": 16, "layers": 1, "time_scale": 1.0}, prediction_type="flow",
                        parameterization="denoiser", sampler="meanflow", **kw)
    return build_student(cfg, teacher)


def exact_ode(teacher, z, t, r, steps=200):
    """The flow-chart ODE solution from z at t to r, per sample, by RK4 in log t on dz/dlog t = z - D(z, t) (float64; the
    chart of distill.eval.exact.ode_reference, every sample on its own time span)."""
    u0, u1 = t.log(), r.log()
    du = append_dims((u1 - u0) / steps, z.ndim)

    def f(y, u):
        return y - teacher.denoise(y, u.exp()).double()

    y = z.double()
    for i in range(steps):
        u = u0 + i * (u1 - u0) / steps
        k1 = f(y, u)
        k2 = f(y + 0.5 * du * k1, u + 0.5 * (u1 - u0) / steps)
        k3 = f(y + 0.5 * du * k2, u + 0.5 * (u1 - u0) / steps)
        k4 = f(y + du * k3, u + (u1 - u0) / steps)
        y = y + du / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return y


class ExactAverageVelocity(torch.nn.Module):
    """A student whose average velocity is the teacher's exact one on a rectified-flow schedule: u(z, r, t) = (z - z_r) /
    (t - r) with z_r the ODE solution from z (Eq. 3 integrated), and v(z, t) at r = t; seen as D = z - t u. No forward-mode
    support (the solve goes through the analytic teacher's float64 CPU code): the objective differentiates it by
    central differences."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, x, t, cond=None, interval=None):
        t, h = torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(interval, dtype=torch.float64)
        v = (x - self.teacher.denoise(x, t).double()) / append_dims(t, x.ndim)
        jump = h != 0
        u = v.clone()
        if bool(jump.any()):
            z_r = exact_ode(self.teacher, x[jump], t[jump], t[jump] - h[jump])
            u[jump] = (x[jump] - z_r) / append_dims(h[jump], x.ndim)
        return x - append_dims(t, x.ndim) * u


def _batch(teacher, n, seed=0):
    x0 = teacher.sample_data(n, torch.Generator().manual_seed(seed))
    return Batch(0, torch.Generator().manual_seed(seed + 1), torch.device("cpu"), n, x0=x0)


def test_the_loss_is_zero_at_the_exact_average_velocity():
    teacher = load_teacher(RING)
    objective = MeanFlow(MeanFlowOptions(jvp="finite_difference", equal_share=0.25), Context(teacher, flow_student(teacher)))
    exact = ExactAverageVelocity(teacher)
    out = objective.loss("student", {"student": exact}, _batch(teacher, 16))
    assert float(out["sq_error"].max()) < 1e-7  # RK4 and central-difference error only; the weighted loss is 1e3 x this
    # the target holds the JVP: with the instantaneous velocity at every interval (a one-step Euler student) it is not zero

    class EulerVelocity(ExactAverageVelocity):
        def forward(self, x, t, cond=None, interval=None):
            return super().forward(x, t, cond, torch.zeros_like(torch.as_tensor(interval, dtype=torch.float64)))

    t, r = objective.sample_times(_batch(teacher, 16), 16)
    out = objective.loss("student", {"student": EulerVelocity(teacher)}, _batch(teacher, 16))
    assert float(out["sq_error"][t > r + 0.1].min()) > 1e-3


def test_the_flow_chart_makes_a_vp_teachers_ode_the_rectified_flows():
    """tau = sigma / (alpha + sigma) and z = x / (alpha + sigma): the VP and the rectified-flow ring share one velocity field."""
    vp, rf = load_teacher("gmm:ring8"), load_teacher(RING)
    t = torch.tensor([0.05, 0.3, 0.6, 0.9], dtype=torch.float64)
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(teacher_velocity(vp.denoise, z, t, None, vp.schedule), teacher_velocity(rf.denoise, z, t, None, rf.schedule),
                          atol=1e-10)
    assert torch.equal(time_of_flow(rf.schedule, t), t)
    for kind in SCHEDULES:  # time_of_flow inverts flow_time on every schedule, inside its trained range
        s = get_schedule(kind)
        times = torch.linspace(s.t_min, s.t_max, 9, dtype=torch.float64)
        assert torch.allclose(time_of_flow(s, flow_time(s, times)), times, rtol=1e-9, atol=1e-9 * s.t_max), kind


@pytest.mark.parametrize("spec", [RING, "gmm:ring8"])
def test_the_sampler_takes_average_velocity_jumps(spec):
    """One step z_0 = z_1 - u(z_1, 0, 1) (Alg. 2), two steps z_0 = z_m - m u(z_m, 0, m) after z_m = z_1 - (1 - m) u(z_1, m, 1),
    written in the flow chart (x = z on a rectified flow; on a VP teacher, x = (alpha + sigma) z)."""
    teacher = load_teacher(spec)
    torch.manual_seed(0)
    student = flow_student(teacher).double()
    objective = MeanFlow(MeanFlowOptions(), Context(teacher, student))
    torch.nn.init.normal_(student.conditions["interval"].proj.weight)  # make the interval input matter
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = teacher.schedule
    t1 = flow_time(s, torch.tensor([s.t_max], dtype=torch.float64)).expand(8)
    z1 = noise / (s.alpha(s.t_max) + s.sigma(s.t_max))

    def u(z, r, t):
        return average_velocity(student, z, t, r, None, s)

    one = z1 - t1[:, None] * u(z1, torch.zeros(8, dtype=torch.float64), t1)
    assert torch.allclose(student.sample(noise, steps=1), one, atol=1e-10)
    m = flow_time(s, student.sampling_timesteps(2)[1:]).expand(8)
    assert torch.allclose(m, t1 / 2, atol=1e-12)  # the recorded times are uniform in flow time
    z_m = z1 - (t1 - m)[:, None] * u(z1, m, t1)
    two = z_m - m[:, None] * u(z_m, torch.zeros(8, dtype=torch.float64), m)
    assert torch.allclose(student.sample(noise, steps=2), two, atol=1e-10)
    assert objective.needs == {"teacher", "data"}


def test_a_tiny_run_moves_one_step_samples_toward_the_exact_ode_endpoint(tmp_path):
    teacher = load_teacher(RING)
    noise = torch.randn(1024, 2, generator=torch.Generator().manual_seed(7))
    end = ode_reference(teacher.denoise, noise.double(), 1.0, teacher.schedule.t_min, teacher.schedule, steps=100)

    def error(student):
        return float((student.sample(noise, steps=1).double() - end).pow(2).mean().sqrt())

    cfg = tiny_cfg(tmp_path / "r", "student.model.hidden=64", "student.model.layers=2", "batch_size=128", "max_steps=250",
                   "checkpoint_every=1000", "log_every=100")
    trained = load_student(run(cfg) / "student.safetensors")
    torch.manual_seed(cfg.seed)  # the run's initial weights (distill.engine.run_setup seeds them so)
    initial = build_student(cfg.student, teacher)
    initial.add_condition("interval", scale=1.0)  # zero-initialised: the same map
    euler = float((teacher.denoise(noise, torch.ones(1024, dtype=torch.float64)).double() - end).pow(2).mean().sqrt())
    # 0.56 against 0.66 at initialisation (a fresh network's u ~ 0 keeps the noise, already near its ring point) and 1.43
    # for the teacher's one DDIM step (the data mean); 3,000 steps of the config's network reach 0.23 (docs/objectives/meanflow.md)
    assert error(trained) < 0.9 * error(initial) and error(trained) < 0.5 * euler


def test_options_are_validated_with_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match="set student.sampler 'meanflow' and student.parameterization 'denoiser'"):
        run(tiny_cfg(tmp_path / "a", "student.sampler=ode"))
    with pytest.raises(ConfigError, match="'objective.jvp' is 'backward'; allowed: auto, forward, finite_difference"):
        tiny_cfg(tmp_path / "b", "objective.jvp=backward")
    with pytest.raises(ConfigError, match="objective 'meanflow' needs real data"):
        run(tiny_cfg(tmp_path / "c", "dataset=null"))


def test_distill_script_runs_it_and_a_resumed_run_is_bit_identical(tmp_path):
    spec = importlib.util.spec_from_file_location("distill_cli", ROOT / "scripts" / "distill.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    sets = [*TINY, "objective.velocity=conditional"]
    assert cli.main(["--config", str(CONFIG), "--output-dir", str(tmp_path / "full"), "--set", *sets]) == 0
    student = load_student(tmp_path / "full" / "student.safetensors")
    assert student.sampler == "meanflow" and "interval" in student.conditions
    assert torch.isfinite(student.sample(torch.randn(16, 2), steps=2)).all()
    cfg = load_run_config(CONFIG, parse_overrides([*sets, f"output_dir={tmp_path / 'killed'}"]))
    assert run(cfg, stop_at=6) is None
    run(cfg, resume="latest")
    assert same_tensors(tmp_path / "full" / "student.safetensors", tmp_path / "killed" / "student.safetensors")


def test_a_teacher_copy_starts_as_the_teachers_velocity_and_its_jvp_is_forward_mode():
    """On the mnist16 UNet (VP, v-prediction): the zero-initialised interval input leaves u(z, r, t) = v(z, t) at every r,
    and the target's JVP runs in forward mode through its attention (SDPA's math kernel)."""
    import warnings

    from distill.core.jvp import jvp

    teacher = load_teacher("mnist16")
    student = build_student(StudentConfig(arch="teacher", parameterization="denoiser", sampler="meanflow",
                                          class_conditional=True), teacher)
    MeanFlow(MeanFlowOptions(), Context(teacher, student))
    g = torch.Generator().manual_seed(0)
    z, cond = torch.randn(2, 1, 16, 16, generator=g), torch.tensor([3, 7])
    t, r = torch.tensor([0.8, 0.5], dtype=torch.float64), torch.tensor([0.1, 0.5], dtype=torch.float64)
    with torch.no_grad():
        v = teacher_velocity(teacher.denoise, z, t, cond, teacher.schedule)
        assert torch.allclose(average_velocity(student, z, t, r, cond, teacher.schedule), v, atol=1e-4)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback to central differences
            _, dudt = jvp(lambda z_, t_: average_velocity(student, z_, t_, r, cond, teacher.schedule), (z, t),
                          (v, torch.ones_like(t)), method="forward")
    assert torch.isfinite(dudt).all() and dudt.shape == z.shape


def test_interval_scale_reaches_the_students_embedding_and_changes_nothing_at_initialisation():
    """``interval_scale`` (1000: every frequency of the sinusoidal features varies over h in [0, 1]) is the embedding's,
    recorded with the student; the zero-initialised embedding leaves the network's output unchanged."""
    teacher = load_teacher(RING)
    torch.manual_seed(0)
    student = flow_student(teacher)
    z, t = torch.randn(8, 2), torch.full((8,), 0.7, dtype=torch.float64)
    before = student(z, t, None).detach()
    MeanFlow(MeanFlowOptions(interval_scale=1000.0), Context(teacher=teacher, student=student))
    assert student.conditions["interval"].config["scale"] == 1000.0
    assert torch.equal(student(z, t, None, interval=torch.full((8,), 0.5, dtype=torch.float64)).detach(), before)
    with pytest.raises(ConfigError, match="'objective.interval_scale'"):
        tiny_cfg(ROOT / "unused", "objective.interval_scale=0")
