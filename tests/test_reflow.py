"""Reflow / Rectified Diffusion (issue #15): one round of an exact model on a Gaussian teacher with a linear flow gives
straight paths; the path is the pair's first-order path; options are validated; every variant resumes bit-identically."""


import pytest
import torch
from distill_helpers import ROOT, run, same_tensors

from distill.core.grids import explicit_grid, make_grid
from distill.engine.config import ConfigError, parse_overrides
from distill.engine.run_config import load_run_config
from distill.engine.trajectories import generate, open_cache
from distill.eval.exact import ode_reference
from distill.objectives.base import Batch, Context
from distill.objectives.losses import add_noise
from distill.objectives.reflow import Reflow, ReflowOptions, phase_pair
from distill.solvers import SOLVERS
from distill.solvers.common import ddim_step, grid_points
from students import load_student
from teachers import load_teacher

CONFIG = ROOT / "configs" / "distill" / "reflow_ring8.yaml"
TINY = ["student.model.hidden=32", "student.model.layers=1", "batch_size=32", "max_steps=12", "checkpoint_every=4",
        "log_every=2"]


@pytest.fixture(scope="module")
def ring8_pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs") / "ring8_rf"
    return generate(load_teacher("gmm:ring8@rectified_flow"), folder, solver="heun", nfe=11, num_samples=96,
                    shard_size=40, final="clean", log=lambda m: None)


def tiny_cfg(out, pairs, *overrides):
    return load_run_config(CONFIG, parse_overrides([*TINY, f"trajectories={pairs}", *overrides, f"output_dir={out}"]))


class AffineRegression(torch.nn.Module):
    """The exact minimiser of the reflow loss when x0 is an affine function of x_t: at each time, the least-squares
    affine map from the objective's own x_t (``first_order_path``) to the pairs' samples."""

    def __init__(self, noise, sample, schedule, t_max):
        super().__init__()
        self.noise, self.sample, self.schedule, self.t_max = noise, sample, schedule, t_max

    def forward(self, x, t, cond=None):
        out = torch.empty_like(x)
        pts = grid_points(self.schedule, torch.tensor([self.t_max, 0.0], dtype=torch.float64))
        for tt in t.unique().tolist():
            x0, eps = phase_pair(self.noise, self.sample, pts[0], pts[1])
            x_u = add_noise(self.schedule, x0, eps, torch.tensor([tt], dtype=torch.float64))
            design = torch.cat([x_u, torch.ones(len(x_u), 1, dtype=x_u.dtype)], 1)
            w = torch.linalg.lstsq(design, x0).solution
            m = t == tt
            out[m] = torch.cat([x[m], torch.ones(int(m.sum()), 1, dtype=x.dtype)], 1) @ w
        return out


def test_one_round_of_an_exact_model_on_a_linear_flow_gives_straight_paths(tmp_path):
    teacher = load_teacher("gmm:gauss2d@rectified_flow")  # one Gaussian: the ODE map noise -> sample is linear
    cache = open_cache(generate(teacher, tmp_path / "pairs", solver="heun", nfe=199, num_samples=256, final="clean",
                                log=lambda m: None))
    rows = cache.rows(range(cache.num_samples))
    noise, sample = rows["noise"].double(), rows["sample"].double()
    exact = AffineRegression(noise, sample, teacher.schedule, teacher.schedule.t_max)
    # it is the minimiser: the objective's own loss on the pairs is zero (to the pairs' float32 rounding)
    cfg = tiny_cfg(tmp_path / "r", tmp_path / "pairs", "teacher=gmm:gauss2d@rectified_flow")
    from students import build_student

    ctx = Context(teacher=teacher, student=build_student(cfg.student, teacher), cache=cache)
    objective = Reflow(ReflowOptions(), ctx)
    batch = Batch(0, torch.Generator().manual_seed(0), torch.device("cpu"), 256, traj={k: v.double() for k, v in rows.items()})
    assert float(objective.loss("student", {"student": _as_net(exact, teacher.schedule)}, batch).max()) < 1e-9
    # and its paths are straight: one Euler (= DDIM) step from t_max lands on its own ODE endpoint
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    one_step = SOLVERS["euler"].fn(exact, x_T, explicit_grid(teacher.schedule, [1.0]), schedule=teacher.schedule)
    t_min = teacher.schedule.t_min
    ode = ode_reference(exact, x_T, 1.0, t_min, teacher.schedule, steps=100)  # RK4 to t_min (sigma > 0 there)
    straight = (1 - t_min) * one_step + t_min * x_T  # the straight line from x_T to the one-step sample, at t_min
    assert (straight - ode).abs().max() < 1e-6
    # the teacher's flow is not straight: its one step is the mean, far from its ODE endpoint
    teacher_one = SOLVERS["euler"].fn(teacher.denoise, x_T, explicit_grid(teacher.schedule, [1.0]), schedule=teacher.schedule)
    teacher_ode = ode_reference(teacher.denoise, x_T, 1.0, teacher.schedule.t_min, teacher.schedule, steps=100)
    assert (teacher_one - teacher_ode).abs().max() > 0.3


def _as_net(denoiser, schedule):
    class Net(torch.nn.Module):
        def forward(self, x, t, cond=None, **extra):
            return denoiser(x, t, cond)

    net = Net()
    net.schedule = schedule
    return net


def _path(z, x_e, s, e, u, schedule):
    x0, eps = phase_pair(z, x_e, s, e)
    return add_noise(schedule, x0, eps, torch.tensor([u.t], dtype=torch.float64)), x0


def test_the_path_is_the_ddim_line_rectified_diffusions_and_a_straight_line_for_rectified_flow():
    teacher = load_teacher("gmm:ring8@rectified_flow")
    g = torch.Generator().manual_seed(0)
    z, x0 = torch.randn(5, 2, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)
    s, e, u = grid_points(teacher.schedule, torch.tensor([1.0, 0.0, 0.3], dtype=torch.float64))
    x_u, target = _path(z, x0, s, e, u, teacher.schedule)
    assert torch.equal(target, x0) and torch.allclose(x_u, 0.3 * z + 0.7 * x0, atol=1e-15)
    vp = load_teacher("mnist16").schedule  # a VP teacher: x_u = alpha_u x0 + sigma_u eps_pair, eps_pair from z_T
    s, e, u = grid_points(vp, torch.tensor([999.0, -1.0, 500.0], dtype=torch.float64))
    x_u, _ = _path(z, x0, s, e, u, vp)
    assert torch.allclose(x_u, ddim_step(z, x0, s, u), atol=1e-12)
    # a phase that ends before clean data: the DDIM line through z_s and x_e, read anywhere in between
    s, e, u = grid_points(vp, torch.tensor([800.0, 400.0, 650.0], dtype=torch.float64))
    x_e = torch.randn(5, 2, generator=g, dtype=torch.float64)
    x_u, x0_star = _path(z, x_e, s, e, u, vp)
    assert torch.allclose(_path(z, x_e, s, e, e, vp)[0], x_e, atol=1e-12)
    assert torch.allclose(_path(z, x_e, s, e, s, vp)[0], z, atol=1e-12)
    assert torch.allclose(x_u, ddim_step(z, x0_star, s, u), atol=1e-12)
    assert torch.allclose(ddim_step(x_u, x0_star, u, e), x_e, atol=1e-12)  # the student's target jump lands on x_e


def test_options_are_validated_with_one_sentence(tmp_path, ring8_pairs):
    with pytest.raises(ConfigError, match="'objective.phases' is 20, but the trajectory cache has only 6 steps; allowed: 1 to 6"):
        run(tiny_cfg(tmp_path / "a", ring8_pairs, "objective.phases=20"))
    with pytest.raises(ConfigError, match="space 'raw' is l2 only"):
        run(tiny_cfg(tmp_path / "b", ring8_pairs, "objective.space=raw", "objective.distance=pseudo_huber"))
    with pytest.raises(ConfigError, match="deterministic DDIM student"):
        run(tiny_cfg(tmp_path / "c", ring8_pairs, "student.sampler=consistency"))
    with pytest.raises(ValueError, match="was made with teacher_hash"):
        run(tiny_cfg(tmp_path / "d", ring8_pairs, "teacher=gmm:ring8"))


@pytest.mark.parametrize("variant", [[], ["objective.phases=2", "objective.distance=pseudo_huber"], ["objective.one_step=true"],
                                     ["objective.space=raw"]], ids=["reflow", "phased", "one_step", "raw"])
def test_each_variant_resumes_bit_identically(tmp_path, ring8_pairs, variant):
    full = run(tiny_cfg(tmp_path / "full", ring8_pairs, *variant))
    assert run(tiny_cfg(tmp_path / "killed", ring8_pairs, *variant), stop_at=6) is None
    run(tiny_cfg(tmp_path / "killed", ring8_pairs, *variant), resume="latest")
    assert same_tensors(full / "student.safetensors", tmp_path / "killed" / "student.safetensors")
    student = load_student(full / "student.safetensors")
    if "objective.phases=2" in variant:  # one DDIM step per phase, from each phase's start (later phases: 1% inside)
        ts = open_cache(ring8_pairs).ts
        second = float(ts[3].floor()) if getattr(student.schedule, "num_train_timesteps", None) else float(ts[3] - 0.01 * (ts[3] - ts[6]))
        assert student.sampling_steps == (2,) and student.sampling_timesteps(2).tolist() == pytest.approx([float(ts[0]), second], abs=1e-12)


@pytest.mark.parametrize("kind", ["uniform", "logsnr"])
def test_reflow_eval_teacher_takes_k_ddim_steps_on_a_students_k_step_grid(kind):
    from conftest import load_script

    teacher = load_teacher("gmm:ring8@rectified_flow")
    s, noise = teacher.schedule, torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, _, sampler, _ = load_script("reflow_eval").model_parts("teacher", teacher, kind)
    for k in (1, 2, 4):  # students.Student.sampling_timesteps: k times from t_max, then the step onto clean data
        grid = explicit_grid(s, make_grid(s, k, kind, final="t_min")[:k], final="clean")
        expected = SOLVERS["euler"].fn(teacher.denoise, noise * float(s.init_noise_scale(s.t_max)), grid, schedule=s)
        assert torch.allclose(sampler(noise, k), expected, atol=1e-12), k


def test_reflow_eval_own_gives_students_their_recorded_steps_and_the_teacher_the_listed_ones(tmp_path, ring8_pairs):
    from conftest import load_script

    student = run(tiny_cfg(tmp_path / "r", ring8_pairs)) / "student.safetensors"
    rows = load_script("reflow_eval").evaluate(load_teacher("gmm:ring8@rectified_flow"), ["teacher", f"s={student}"],
                                               ["own", "3"], 40)
    steps = [(r["model"], r["steps"]) for r in rows]
    assert steps == [("teacher", "ode"), ("teacher", 3), ("s", "ode"), *[("s", k) for k in load_student(student).sampling_steps]]


def test_discrete_phases_start_at_a_time_their_own_phase_trained_on():
    """On an integer-time schedule a later phase samples from floor(start), a time the objective trains that phase on
    and no other phase (the mnist16 cache's 16-step uniform grid puts boundaries at 732.6, 466.2, 199.8, which no
    phase trains on)."""
    from types import SimpleNamespace

    from distill.core.schedules import DiscreteVP
    from distill.objectives.reflow import Reflow, ReflowOptions, phase_bounds, phase_starts

    ts = torch.tensor([999.0 - 66.6 * i for i in range(15)] + [0.0, -1.0], dtype=torch.float64)
    bounds = phase_bounds(len(ts), 4)
    starts = phase_starts(ts, bounds, discrete=True, inset=0.01)
    assert starts == [999.0, 732.0, 466.0, 199.0]
    # the times Reflow._times draws for each phase (every integer of a phase is drawn among 20,000 draws)
    fake = SimpleNamespace(ts=ts, bounds=bounds, o=ReflowOptions(phases=4), schedule=DiscreteVP(beta_schedule="squaredcos_cap_v2"))
    g = torch.Generator().manual_seed(0)
    trained = [set(Reflow._times(fake, torch.full((20000,), k), g).tolist()) for k in range(4)]
    for k, start in enumerate(starts):
        assert start in trained[k] and not any(start in trained[j] for j in range(4) if j != k), (k, start)
    assert not any(float(ts[b]) in t for b in bounds[1:-1] for t in trained)  # the fractional boundaries themselves
    # continuous time keeps the inset
    cont = phase_starts(ts, bounds, discrete=False, inset=0.01)
    assert cont[0] == 999.0 and cont[1] == pytest.approx(732.6 - 0.01 * (732.6 - 466.2))
