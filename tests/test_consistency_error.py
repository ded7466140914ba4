"""The per-time consistency error against the teacher's ODE (distill.eval.consistency_error, scripts/consistency_error.py)."""

import csv
import types

import torch

from distill.eval.consistency_error import consistency_error, teacher_ode_end
from teachers import load_teacher


def test_exact_map_has_zero_error_and_identity_has_the_ode_displacement():
    teacher = load_teacher("gmm:gauss2d")
    x0 = teacher.sample_data(512, generator=torch.Generator().manual_seed(0)).float()
    times = [0.9, 0.5, 0.1]

    def exact(x, t, cond):
        return teacher.exact_ode_solution(x, float(t[0]), teacher.schedule.t_clean)

    rows = consistency_error(exact, teacher, x0, times, generator=torch.Generator().manual_seed(1))
    assert [r["t"] for r in rows] == times and all(r["err"] < 1e-6 and abs(r["bias"]) < 1e-6 for r in rows)
    ident = consistency_error(lambda x, t, c: x, teacher, x0, times, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    for r, t in zip(ident, times):
        a, s = float(teacher.schedule.alpha(torch.tensor([t]))), float(teacher.schedule.sigma(torch.tensor([t])))
        xt = a * x0 + s * torch.randn(x0.shape, generator=g)
        ref = teacher.exact_ode_solution(xt, t, teacher.schedule.t_clean)
        assert abs(r["err"] - float((xt - ref).double().pow(2).mean().sqrt())) < 1e-6
        assert abs(r["move"] - float((ref - x0).double().pow(2).mean().sqrt())) < 1e-6
    assert ident[0]["err"] > 0.3  # the identity is far off at high noise


def test_numeric_reference_solve_agrees_with_the_closed_form():
    teacher = load_teacher("gmm:gauss2d")
    plain = types.SimpleNamespace(schedule=teacher.schedule, denoise=teacher.denoise)  # no closed form: the solver path
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (0.8, 0.3):
        ours = teacher_ode_end(plain, x, t, steps=40)
        assert (ours - teacher.exact_ode_solution(x, t, teacher.schedule.t_clean)).abs().max() < 1e-2


def test_numeric_reference_solve_starts_a_flow_teacher_at_pure_noise():
    teacher = load_teacher("gmm:gauss2d", schedule="rectified_flow")  # lam(t = 1) = -inf: the solve starts at the floor
    plain = types.SimpleNamespace(schedule=teacher.schedule, denoise=teacher.denoise)
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (teacher.schedule.t_max, 0.5):
        ours = teacher_ode_end(plain, x, t, steps=40)
        t_exact = min(t, 1 - 1e-7)  # the closed form divides by alpha(t), 0 at t = 1; the ODE moves x by ~1e-7 before it
        assert (ours - teacher.exact_ode_solution(x, t_exact, teacher.schedule.t_clean)).abs().max() < 2e-2


def test_script_writes_rows_and_replaces_a_students_rows_on_rerun(tmp_path):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "consistency_error.py"
    spec = importlib.util.spec_from_file_location("consistency_error_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    student = "results/mnist16/students/cd_mnist16.safetensors"
    argv = ["--students", f"cd={student},teacher", "--times", "999,50", "--num-samples", "8", "--reference-steps", "3",
            "--out", str(tmp_path)]
    assert mod.main(argv) == 0
    rows = list(csv.DictReader((tmp_path / "consistency_error.csv").open()))
    assert sorted((r["student"], r["source"]) for r in rows) == sorted(
        [("cd", "data")] * 2 + [("cd", "one_step")] * 2 + [("teacher", "data")] * 2)
    assert mod.main(argv[:1] + [f"cd={student}"] + argv[2:]) == 0
    assert len(list(csv.DictReader((tmp_path / "consistency_error.csv").open()))) == 6
    assert mod.main(argv[:3] + ["5000"] + argv[4:]) == 1  # a time outside the teacher's range is refused
