"""Consistency distillation: boundary condition, distances, the teacher step, and a real improvement on ring8."""

import math

import pytest
import torch
from distill_helpers import run, tiny_cfg

from distill.core.grids import explicit_grid
from distill.core.schedules import get_schedule
from distill.eval.exact import sliced_wasserstein
from distill.objectives.base import Context
from distill.objectives.losses import distance, grouped_step
from distill.solvers import SOLVERS
from students import build_student, load_student
from students.student import edm_boundary, parameterize
from teachers import load_teacher


def _student(tmp_path, *overrides):
    cfg = tiny_cfg(tmp_path, *overrides)
    torch.manual_seed(0)
    return build_student(cfg.student, load_teacher(cfg.teacher)), cfg


def test_boundary_condition_holds_exactly_at_t_min(tmp_path):
    student, _ = _student(tmp_path)
    x, sched = torch.randn(16, 2), student.schedule
    assert torch.equal(student(x, torch.full((16,), sched.t_min)), x)
    c_skip, c_out = student.boundary(torch.tensor([sched.t_min, sched.t_max]))
    assert c_skip[0] == 1 and c_out[0] == 0 and c_skip[1] < 1e-4 and c_out[1] > 0.999
    assert not torch.allclose(student(x, torch.full((16,), 0.5)), x)


@pytest.mark.parametrize("schedule", ["vp_cosine", "edm", "rectified_flow"])
def test_consistency_edm_is_the_boundary_on_the_edm_raw_output(schedule):
    """consistency_edm: f = c_skip(s) x~ + c_out(s) F with x~ = x / alpha and F = (D - c_skip^EDM x~) / c_out^EDM
    (Song et al. 2023, App. C) at interior times; f(x, t_min) = x / alpha(t_min); f -> D where sigma~ >> sigma~_min,
    finite at a flow's t_max (alpha = 0)."""
    sched, sd = get_schedule(schedule), 0.5
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    lo_a, lo_s = sched.log_alpha_sigma(torch.tensor([sched.t_min], dtype=torch.float64))
    st_min = float((lo_s - lo_a).exp()[0])
    for u in (0.05, 0.3, 0.7, 0.95):
        t = torch.full((5,), sched.t_min + u * (sched.t_max - sched.t_min), dtype=torch.float64)
        log_a, log_s = sched.log_alpha_sigma(t)
        alpha, st = log_a.exp()[:, None], (log_s - log_a).exp()[:, None]
        xt, s = x / alpha, st - st_min
        F = (d - sd**2 / (st**2 + sd**2) * xt) / (st * sd / (st**2 + sd**2).sqrt())
        ref = sd**2 / (s**2 + sd**2) * xt + s * sd / (s**2 + sd**2).sqrt() * F
        assert torch.allclose(parameterize("consistency_edm", sched, sd, x, t, d), ref, rtol=1e-9, atol=1e-9), (schedule, u)
    t_min = torch.full((5,), sched.t_min, dtype=torch.float64)
    alpha_min = float(sched.log_alpha_sigma(t_min)[0].exp()[0])
    assert torch.allclose(parameterize("consistency_edm", sched, sd, x, t_min, d), x / alpha_min, rtol=1e-12, atol=0)
    a, r = edm_boundary(sched, torch.tensor([sched.t_max], dtype=torch.float64), sd)
    assert torch.isfinite(a).all() and abs(float(a[0])) < 1e-3 and abs(float(r[0]) - 1) < 1e-3
    # the old form is biased between: f = (c_skip + c_out) x0 > x0 for D = x = x0 at sigma~ = sigma_data
    t_mid = sched.t_of_lam(torch.tensor([math.log(1 / sd)], dtype=torch.float64)).expand(5)
    old = parameterize("consistency", sched, sd, x, t_mid, x)
    assert (old / x).min() > 1.2


def test_pseudo_huber_and_l2_distances():
    a, b = torch.zeros(2, 4), torch.tensor([[3.0, 4.0, 0, 0], [0, 0, 0, 0]])
    c = 0.00054 * math.sqrt(4)
    assert torch.allclose(distance(a, b, "pseudo_huber"), torch.tensor([math.sqrt(25 + c * c) - c, 0.0]))
    assert torch.allclose(distance(a, b, "pseudo_huber", huber_c=1.0), torch.tensor([math.sqrt(26) - 1, 0.0]))
    assert torch.allclose(distance(a, b, "l2"), torch.tensor([25 / 4, 0.0]))


def test_teacher_step_is_the_registered_solver_on_each_samples_pair_of_grid_times(tmp_path):
    from distill.objectives.consistency import ConsistencyDistillation, ConsistencyOptions

    student, _ = _student(tmp_path)
    teacher = load_teacher("gmm:ring8")
    cd = ConsistencyDistillation(ConsistencyOptions(num_scales=5, solver="dpmpp_2m"), Context(teacher, student))
    x, j = torch.randn(6, 2), torch.tensor([0, 3, 1, 0, 2, 3])
    out = grouped_step(SOLVERS["dpmpp_2m"].fn, teacher.denoise, x, cd.ts[j], cd.ts[j + 1], teacher.schedule)
    for i in range(6):
        grid = explicit_grid(teacher.schedule, cd.ts[j[i]:j[i] + 2], final="t_min")
        ref = SOLVERS["dpmpp_2m"].fn(teacher.denoise, x[i:i + 1], grid, schedule=teacher.schedule)
        assert torch.equal(out[i:i + 1], ref)


def test_consistency_distillation_on_ring8_improves_one_step_samples(tmp_path):
    """300 steps of CD (Heun teacher steps on the exact denoiser) take the one-step sliced Wasserstein distance to
    exact data from that of the untrained student to less than half of it."""
    teacher = load_teacher("gmm:ring8")
    ref = teacher.sample_data(2000, generator=torch.Generator().manual_seed(1)).float()
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(2))
    overrides = ["student.model.hidden=128", "student.model.layers=3", "objective.num_scales=18", "batch_size=256",
                 "max_steps=300", "checkpoint_every=300", "log_every=100"]
    start, cfg = _student(tmp_path / "cd", *overrides)
    sw_start = sliced_wasserstein(start.sample(noise, 1), ref)
    run(cfg)
    student = load_student(tmp_path / "cd" / "student.safetensors")
    sw_end = sliced_wasserstein(student.sample(noise, 1), ref)
    assert sw_end < 0.5 * sw_start, (sw_start, sw_end)
    for steps in (2, 3, 4):  # multistep consistency sampling runs and stays on the data scale
        x = student.sample(noise[:200], steps, generator=torch.Generator().manual_seed(0))
        assert x.shape == (200, 2) and bool(torch.isfinite(x).all()) and x.norm(dim=1).median() < 4
