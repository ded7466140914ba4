"""SLAM and guidance-distilled consistency students: SLAM at gamma = 1 is consistency distillation, the sub-path
point and its effective noise level against a Monte-Carlo estimate on the analytic teacher, eps / v / x / flow
teachers agree, w-conditioned students, the iCT options, and resume."""

import csv
import json
import types

import pytest
import torch
from distill_helpers import run, same_tensors, tiny_cfg
from torch import nn

from distill.core.param import PREDICTION_TYPES, from_x0
from distill.engine.config import ConfigError
from distill.objectives.base import Batch, Context
from distill.objectives.consistency import ConsistencyDistillation, ConsistencyOptions, curriculum_scales, lognormal_weights
from distill.objectives.losses import add_noise
from distill.objectives.slam import SlamOptions, SubPathLinearApproximation, sub_path_point
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


# -- the sub-path point and its effective noise level ----------------------------------------------------
@pytest.mark.parametrize("spec", ["gmm:ring8", "gmm:ring8@rectified_flow"])
def test_sub_path_point_and_effective_noise_level_match_a_monte_carlo_estimate(spec):
    """With x_e = alpha_e x0 + sigma_e eps and x_s its forward transition to t_s (the drift model behind SLAM's
    sigma~), z_gamma is a forward-process state at t_gamma: its noise around alpha(t_gamma) x0 has the variance
    sigma(t_gamma)^2, and the analytic teacher denoises it exactly as well as a true x_{t_gamma} (same MMSE)."""
    teacher = load_teacher(spec)
    sched, n, g = teacher.schedule, 200_000, torch.Generator().manual_seed(0)
    x0 = teacher.sample_data(n, generator=g)
    t_s, t_e = torch.full((n,), 0.55, dtype=torch.float64), torch.full((n,), 0.3, dtype=torch.float64)
    a_s, s_s, a_e, s_e = (float(f(t)[0]) for f, t in ((sched.alpha, t_s), (sched.sigma, t_s), (sched.alpha, t_e),
                                                        (sched.sigma, t_e)))
    r = a_s / a_e
    x_e = add_noise(sched, x0, torch.randn(x0.shape, generator=g, dtype=x0.dtype), t_e)
    x_s = r * x_e + (s_s**2 - (r * s_e) ** 2) ** 0.5 * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    ref_noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    for gamma in (0.0, 0.3, 0.7, 1.0):
        z, t_g = sub_path_point(sched, x_s, t_s, x_e, t_e, torch.full((n,), gamma, dtype=torch.float64))
        a_g, s_g = float(sched.alpha(t_g[:1])), float(sched.sigma(t_g[:1]))
        assert torch.allclose(z * a_s / a_g, gamma * x_s + (1 - gamma) * r * x_e, atol=1e-12)  # the sub-path point
        assert float(t_e[0]) - 1e-9 <= float(t_g[0]) <= float(t_s[0]) + 1e-9
        var = (z - a_g * x0).var(0)  # Monte-Carlo noise variance per dimension
        assert torch.allclose(var, torch.full_like(var, s_g**2), rtol=0.02), (gamma, var, s_g**2)
        mse = (teacher.denoise(z, t_g) - x0).pow(2).sum(1).mean()
        mmse = (teacher.denoise(add_noise(sched, x0, ref_noise, t_g), t_g) - x0).pow(2).sum(1).mean()
        assert abs(float(mse / mmse) - 1) < 0.03, (gamma, float(mse), float(mmse))
    # the linear-in-gamma noise level (no quadrature) is measurably another one: the test can tell them apart
    lin = 0.5 * s_s + 0.5 * r * s_e
    quad = (float(sched.sigma(sub_path_point(sched, x_s[:1], t_s[:1], x_e[:1], t_e[:1], torch.tensor([0.5]))[1])) /
            float(sched.alpha(sub_path_point(sched, x_s[:1], t_s[:1], x_e[:1], t_e[:1], torch.tensor([0.5]))[1])) * a_s)
    assert abs(quad / lin - 1) > 0.02


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
