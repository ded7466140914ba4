"""SLAM and guidance-distilled consistency students: SLAM at gamma = 1 is consistency distillation, the sub-path
point lies on the teacher's trajectory for real distillation pairs, the official form, eps / v / x / flow
teachers agree, w-conditioned students, the iCT options, and resume."""

import csv
import json
import types

import pytest
import torch
from distill_helpers import run, same_tensors, tiny_cfg
from torch import nn

from distill.core.grids import explicit_grid
from distill.core.param import PREDICTION_TYPES, from_x0
from distill.engine.config import ConfigError
from distill.objectives.base import Batch, Context
from distill.objectives.consistency import ConsistencyDistillation, ConsistencyOptions, curriculum_scales, lognormal_weights
from distill.objectives.losses import add_noise, grouped_step
from distill.objectives.slam import SlamOptions, SubPathLinearApproximation, effective_sigma2, sub_path_point
from distill.solvers import SOLVERS
from students import build_student, load_student
from students.student import Student
from teachers import load_teacher


def _student(tmp_path, *overrides):
    cfg = tiny_cfg(tmp_path, *overrides)
    torch.manual_seed(0)
    return build_student(cfg.student, load_teacher(cfg.teacher))


def _batch(teacher, n=64, seed=3, cond=None):
    x0 = teacher.sample_data(n, generator=torch.Generator().manual_seed(1)).float()
    return Batch(0, torch.Generator().manual_seed(seed), torch.device("cpu"), n, x0=x0, cond=cond)


# -- gamma = 1 is consistency distillation ---------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"skip_steps": 3, "time_sampling": "lognormal", "solver": "dpmpp_2m"}])
def test_slam_at_gamma_one_equals_the_cd_loss_on_the_same_batch(tmp_path, options):
    teacher = load_teacher("gmm:ring8")
    cd = ConsistencyDistillation(ConsistencyOptions(num_scales=8, **options), Context(teacher, _student(tmp_path)))
    slam = SubPathLinearApproximation(SlamOptions(num_scales=8, gamma_min=1.0, **options), Context(teacher, _student(tmp_path)))
    nets_cd, nets_slam = {"student": cd.student}, {"student": slam.student}
    assert "gamma" in slam.student.conditions and "gamma" not in cd.student.conditions
    assert torch.equal(cd.loss("student", nets_cd, _batch(teacher)), slam.loss("student", nets_slam, _batch(teacher)))
    slam.o.gamma_min = 0.0  # gamma ~ U[0, 1]: another loss on the same batch
    assert not torch.allclose(cd.loss("student", nets_cd, _batch(teacher)), slam.loss("student", nets_slam, _batch(teacher)))


# -- the sub-path point and its label -------------------------------------------------------------------------
def _ode(teacher, x, t_from: float, t_to: float, steps: int = 400):
    """A fine solve of the teacher's ODE from t_from to t_to (uniform in log-SNR), the reference trajectory."""
    sched = teacher.schedule
    lams = torch.linspace(float(sched.lam(torch.tensor([t_from]))), float(sched.lam(torch.tensor([t_to]))), steps + 1)
    grid = explicit_grid(sched, sched.t_of_lam(lams.double()).tolist(), final="t_min")
    return SOLVERS["dpmpp_2m"].fn(teacher.denoise, x, grid, schedule=sched)


def _relabelled_by_official_sigma(sched, x_s, t_s, x_e, t_e, gamma):
    """The label before 0.2.0: z_gamma at the time whose noise std is the official code's s_gamma (independent noise)."""
    (la_s, ls_s), (la_e, ls_e) = sched.log_alpha_sigma(t_s), sched.log_alpha_sigma(t_e)
    r = (la_s - la_e).exp()
    z = gamma[:, None] * x_s + (1 - gamma[:, None]) * float(r[0]) * x_e
    t_g = sched.t_of_lam(la_s - effective_sigma2(la_s, ls_s, la_e, ls_e, gamma).log() / 2)
    return z * float((sched.log_alpha_sigma(t_g)[0] - la_s).exp()[0]), t_g


@pytest.mark.parametrize("spec", ["gmm:ring8", "gmm:ring8@rectified_flow"])
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_sub_path_point_lies_on_the_teachers_trajectory_for_real_distillation_pairs(spec, solver):
    """x_e is the teacher's own step from x_s (CD's pair, shared noise): the labelled z_gamma lies within the teacher's
    (DDIM) step error of the fine ODE solution at its label; the label by the official s_gamma (independent noise,
    the form used before 0.2.0) misses it by more."""
    teacher = load_teacher(spec)
    sched, n, g = teacher.schedule, 512, torch.Generator().manual_seed(0)
    x0 = teacher.sample_data(n, generator=g)
    for ts, te in ((0.55, 0.5), (0.9, 0.85), (0.3, 0.26)):  # steps of CD's size (18-40 scales over [0, 1])
        t_s, t_e = torch.full((n,), ts, dtype=torch.float64), torch.full((n,), te, dtype=torch.float64)
        x_s = add_noise(sched, x0, torch.randn(x0.shape, generator=g, dtype=x0.dtype), t_s)
        x_e = grouped_step(SOLVERS[solver].fn, teacher.denoise, x_s, t_s, t_e, sched)
        # the error of a first-order (DDIM) step: the sub-path is a line, so this bounds its error whatever the solver
        ddim = grouped_step(SOLVERS["euler"].fn, teacher.denoise, x_s, t_s, t_e, sched)
        step_error = (ddim - _ode(teacher, x_s, ts, te)).pow(2).mean().sqrt()
        for gamma in (0.2, 0.5, 0.8):
            gam = torch.full((n,), gamma, dtype=torch.float64)
            z, t_g = sub_path_point(sched, x_s, t_s, x_e, t_e, gam)
            assert te < float(t_g[0]) < ts
            error = (z - _ode(teacher, x_s, ts, float(t_g[0]))).pow(2).mean().sqrt()
            assert error <= step_error + 1e-4, (ts, te, gamma, float(error), float(step_error))
            z_old, t_old = _relabelled_by_official_sigma(sched, x_s, t_s, x_e, t_e, gam)
            old_error = (z_old - _ode(teacher, x_s, ts, float(t_old[0]))).pow(2).mean().sqrt()
            assert old_error > 1.3 * error + 1e-4, (ts, te, gamma, float(old_error), float(error))
            assert old_error > step_error, (ts, te, gamma, float(old_error), float(step_error))


def test_sub_path_point_at_a_flow_teachers_pure_noise_end_is_finite():
    """At t_s = 1 of a rectified-flow teacher alpha_s = 0: z_gamma = gamma x_s lies at t = 1 and is read as x_s itself."""
    sched = load_teacher("gmm:ring8@rectified_flow").schedule
    x_s, x_e = torch.randn(16, 2, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    t_s, t_e = torch.ones(16, dtype=torch.float64), torch.full((16,), 0.9, dtype=torch.float64)
    z, t_g = sub_path_point(sched, x_s, t_s, x_e, t_e, torch.linspace(0.05, 1.0, 16, dtype=torch.float64))
    assert torch.isfinite(z).all() and torch.allclose(t_g, t_s) and torch.allclose(z, x_s)


def test_official_form_converts_eps_at_t_s_with_its_own_noise_std(tmp_path):
    """The official form (SPLAM code): the student at time t_{n+k} with the gamma code, eps -> x0 with s_gamma; at
    gamma = 1, s_gamma = sigma_s, so it is the student's own f(x_s, t_s), for eps and v students alike."""
    teacher = load_teacher("gmm:ring8")
    student = _student(tmp_path, "student.prediction_type=epsilon", "student.arch=mlp")
    slam = SubPathLinearApproximation(SlamOptions(num_scales=8, sub_path="official"), Context(teacher, student))
    batch = _batch(teacher)
    p = slam.pair(batch)
    ones = torch.ones(len(p.x_next), dtype=torch.float64)
    with torch.no_grad():
        f_one = slam.official_student(slam.student, p, ones, None)
        assert torch.allclose(f_one, slam.student(p.x_next, p.t_next, None, gamma=ones), atol=1e-5)
        half = torch.full_like(ones, 0.5)
        (la_s, ls_s), (la_e, ls_e) = (teacher.schedule.log_alpha_sigma(t.double()) for t in (p.t_next, p.t_cur))
        r = (la_s - la_e).exp()[:, None].float()
        z = 0.5 * p.x_next + 0.5 * r * p.x_cur
        eps = slam.student(z, p.t_next, None, raw=True, gamma=half)
        s_g = effective_sigma2(la_s, ls_s, la_e, ls_e, half).sqrt()[:, None].float()
        x0 = (z - s_g * eps) / la_s.exp()[:, None].float()
        assert torch.allclose(slam.official_student(slam.student, p, half, None),
                              slam.student.from_data_prediction(z, p.t_next, x0), atol=1e-5)
    # a v-prediction student: its output read as the eps it means at t_{n+k}, then the same conversion
    v_student = _student(tmp_path, "student.prediction_type=v_prediction", "student.arch=mlp")
    v_slam = SubPathLinearApproximation(SlamOptions(num_scales=8, sub_path="official"), Context(teacher, v_student))
    with torch.no_grad():
        assert torch.allclose(v_slam.official_student(v_slam.student, p, ones, None),
                              v_slam.student(p.x_next, p.t_next, None, gamma=ones), atol=1e-5)


# -- every teacher parameterization through the one conversion -------------------------------------------
class ExactNet(nn.Module):
    """The analytic teacher's exact denoiser presented as a network predicting ``prediction_type`` (float64)."""

    def __init__(self, teacher, prediction_type):
        super().__init__()
        self.teacher, self.prediction_type = teacher, prediction_type
        self.time_embedding = nn.Linear(1, 8).double()  # where extra conditions are added

    def forward(self, x, t, class_labels=None):
        h = self.time_embedding(t[:, None])
        a, s = self.teacher.schedule.alpha(t), self.teacher.schedule.sigma(t)
        raw = from_x0(self.teacher.denoise(x, t), self.prediction_type, x, a, s)
        return raw + 0.0 * h.sum(1, keepdim=True)


@pytest.mark.parametrize("objective", ["consistency", "slam"])
def test_eps_v_x_flow_teachers_and_students_agree_on_an_analytic_teacher(objective):
    exact = load_teacher("gmm:ring8")
    losses = {}
    for ptype in PREDICTION_TYPES:
        net = ExactNet(exact, ptype)
        student = Student(ExactNet(exact, ptype), schedule=exact.schedule, prediction_type=ptype, sigma_data=1.0)
        teacher_net = Student(net, schedule=exact.schedule, prediction_type=ptype, parameterization="denoiser")
        teacher = types.SimpleNamespace(schedule=exact.schedule, denoise=teacher_net.denoise, num_classes=0,
                                        has_uncond=False, name=f"exact-{ptype}")
        cls, opts = (ConsistencyDistillation, ConsistencyOptions) if objective == "consistency" else \
            (SubPathLinearApproximation, SlamOptions)
        obj = cls(opts(num_scales=10, skip_steps=2, solver="heun", distance="l2"), Context(teacher, student))
        obj.target.double()  # the engine's copies are float32; this test compares in float64
        batch = _batch(exact, 256)
        batch.x0 = batch.x0.double()
        losses[ptype] = obj.loss("student", {"student": student}, batch)
    for ptype in PREDICTION_TYPES:
        assert torch.allclose(losses[ptype], losses["sample"], rtol=1e-6, atol=1e-9), ptype
    assert float(losses["sample"].detach().mean()) > 0


# -- guidance-distilled (w-conditioned) students ----------------------------------------------------------
@pytest.mark.parametrize("objective", ["consistency", "slam"])
def test_a_w_conditioned_student_at_one_w_matches_a_fixed_w_run(tmp_path, objective):
    """guidance_range [2, 2] with the extra embeddings frozen (condition_lr 0) trains exactly as guidance_scale 2."""
    common = [f"objective.name={objective}", "student.class_conditional=true", "max_steps=6", "grad_clip=null",
              "log_every=1", "objective.condition_lr=0.0"]
    runs = {"fixed": ["objective.guidance_scale=2.0"], "range": ["objective.guidance_range=[2.0, 2.0]"]}
    losses = {}
    for name, extra in runs.items():
        run(tiny_cfg(tmp_path / name, *common, *extra))
        losses[name] = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert losses["fixed"] == losses["range"] and len(losses["fixed"]) == 6
    student = load_student(tmp_path / "range" / "student.safetensors")
    assert student.conditions["w"].config["default"] == 2.0


def test_w_student_samples_at_any_w_with_one_network_call_per_step(tmp_path):
    run(tiny_cfg(tmp_path / "r", "objective.name=slam", "student.class_conditional=true", "max_steps=4",
                 "objective.guidance_range=[1.0, 4.0]"))
    student = load_student(tmp_path / "r" / "student.safetensors")
    assert set(student.conditions) == {"w", "gamma"} and student.conditions["w"].config["default"] == 2.5
    torch.nn.init.normal_(student.conditions["w"].proj.weight)  # a trained w embedding
    calls = []
    student.net.register_forward_hook(lambda *a: calls.append(1))
    noise, cond = torch.randn(8, 2), torch.arange(8)
    x = {w: student.sample(noise, 2, cond, generator=torch.Generator().manual_seed(0), w=w) for w in (1.0, 3.0)}
    assert len(calls) == 4  # 2 steps x 2 scales: one call per step
    assert not torch.allclose(x[1.0], x[3.0])
    default = student.sample(noise, 2, cond, generator=torch.Generator().manual_seed(0))
    assert torch.equal(default, student.sample(noise, 2, cond, generator=torch.Generator().manual_seed(0), w=2.5, gamma=1.0))


def test_bench_passes_its_guidance_scale_to_a_w_student_only(tmp_path):
    from distill.eval.bench import student_sample

    seen = []
    fake = types.SimpleNamespace(conditions={"w": None}, sample=lambda noise, steps, cond, **extra: seen.append(extra))
    student_sample(fake, torch.zeros(2, 2), 1, None, seed=0, guidance_scale=2.0)
    student_sample(fake, torch.zeros(2, 2), 1, None, seed=0, guidance_scale=None)
    fake.conditions = {}
    student_sample(fake, torch.zeros(2, 2), 1, None, seed=0, guidance_scale=2.0)
    assert seen == [{"w": 2.0}, {}, {}]


# -- the iCT options --------------------------------------------------------------------------------------
def test_curriculum_doubles_from_s0_to_s1_and_lognormal_weights_follow_the_erf_masses():
    # iCT: s0 = 10, s1 = 1280, K = 400,000 -> K' = 50,000, N = 11, 21, ..., 1281
    assert [curriculum_scales(k, 400_000, 11, 1281) for k in (0, 49_999, 50_000, 100_000, 399_999)] == [11, 11, 21, 41, 1281]
    assert curriculum_scales(10**9, 400_000, 11, 1281) == 1281
    # s1 / s0 = 5: K' = floor(K / (log2 5 + 1)) = 301 of K = 1000, so N reaches s1 + 1 = 51 within K (a floored log2 gave 41)
    assert [curriculum_scales(k, 1000, 11, 51) for k in (300, 301, 602, 903, 999)] == [11, 21, 41, 51, 51]
    teacher = load_teacher("gmm:ring8")
    from distill.core.grids import make_grid

    ts = make_grid(teacher.schedule, 40, "karras", final="t_min")
    p = lognormal_weights(teacher.schedule, ts, 1, -1.1, 2.0)
    log_sigma = -teacher.schedule.lam(ts)
    mode = int(p.argmax())
    assert log_sigma[mode + 1] - 1.0 < -1.1 < log_sigma[mode] + 1.0 and len(p) == 40 and bool((p > 0).all())


def test_options_are_validated_with_one_sentence(tmp_path):
    bad = {"objective.skip_steps=6": "skip_steps' is 6; allowed: 1 to 5",
           "objective.guidance_range=[3.0, 1.0]": "must be \\[w_min, w_max\\]",
           "objective.time_sampling=normal": "allowed: uniform, lognormal",
           "objective.gamma_min=1.5": "at most 1.0"}
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            run(tiny_cfg(tmp_path / "bad", "objective.name=slam", "student.class_conditional=true", override))
    with pytest.raises(ConfigError, match="exclude each other"):
        run(tiny_cfg(tmp_path / "bad", "student.class_conditional=true", "objective.guidance_scale=2.0",
                     "objective.guidance_range=[1.0, 2.0]"))


# -- resume ----------------------------------------------------------------------------------------------
def test_slam_with_every_option_resumes_bit_identically(tmp_path):
    opts = ["objective.name=slam", "student.class_conditional=true", "objective.guidance_range=[1.0, 3.0]",
            "objective.skip_steps=2", "objective.time_sampling=lognormal", "objective.curriculum_steps=8",
            "objective.curriculum_start=3", "objective.condition_lr=0.01", "max_steps=12", "checkpoint_every=4"]
    run(tiny_cfg(tmp_path / "full", *opts))
    assert run(tiny_cfg(tmp_path / "killed", *opts), stop_at=6) is None
    run(tiny_cfg(tmp_path / "killed", *opts), resume="latest")
    for name in ("student.safetensors", "student_ema.safetensors", "networks.safetensors"):
        assert same_tensors(tmp_path / "full" / name, tmp_path / "killed" / name), name


def test_gmm_students_writes_a_row_per_step_count_with_seeded_renoising(tmp_path):
    from conftest import load_script

    file = run(tiny_cfg(tmp_path / "cd")) / "student.safetensors"
    gmm_students = load_script("gmm_students")
    args = ["--teacher", "gmm:ring8", "--students", f"cd={file}", "--steps", "1", "2", "--num-samples", "64"]
    assert gmm_students.main([*args, "--out", str(tmp_path / "a.csv")]) == 0
    torch.rand(7)  # global draws in between change nothing: the re-noising has its own generator
    assert gmm_students.main([*args, "--out", str(tmp_path / "b.csv")]) == 0
    lines = (tmp_path / "a.csv").read_text().splitlines()
    assert [line.split(",")[1:3] for line in lines[1:]] == [["exact data (another draw)", "0"], ["cd", "1"], ["cd", "2"]]
    assert (tmp_path / "b.csv").read_text() == (tmp_path / "a.csv").read_text()
    rows = list(csv.DictReader(open(tmp_path / "a.csv")))
    assert list(rows[0]) == gmm_students.COLUMNS and rows[0]["modes_lost"] == "0"  # exact data keeps every mode
    for r in rows:
        w = [float(v) for v in r["mode_weights"].split()]
        assert float(r["mode_min"]) == pytest.approx(min(w), abs=1e-3) and float(r["mode_max"]) == pytest.approx(max(w), abs=1e-3)
        assert int(r["modes_lost"]) == sum(v < 0.1 / 8 for v in w)
    (tmp_path / "old.csv").write_text("teacher,method,steps,swd\n")  # an older CSV's columns: refused, not mixed
    assert gmm_students.main([*args, "--out", str(tmp_path / "old.csv")]) == 1
    assert (tmp_path / "old.csv").read_text() == "teacher,method,steps,swd\n"
