"""Progressive distillation (issue #15): the closed-form target is two teacher DDIM steps, on an analytic teacher and
on the committed mnist16 teacher in float64; options are validated; a run resumes bit-identically."""

import pytest
import torch
from distill_helpers import ROOT, run, same_tensors

from distill.core.grids import explicit_grid
from distill.engine.config import ConfigError
from distill.objectives.progressive import loss_weight, progressive_target, teacher_grid
from distill.solvers import SOLVERS
from students import load_student
from teachers import load_teacher

CONFIG = ROOT / "configs" / "distill" / "progressive_ring8.yaml"
TINY = ["student.model.hidden=32", "student.model.layers=1", "objective.student_steps=4", "batch_size=32",
        "max_steps=12", "checkpoint_every=4", "log_every=2"]


def tiny_cfg(out, *overrides):
    from distill.engine.config import parse_overrides
    from distill.engine.run_config import load_run_config

    return load_run_config(CONFIG, parse_overrides([*TINY, *overrides, f"output_dir={out}"]))


def _check_two_steps_in_one(teacher, z, i, grid, cond=None, tol=1e-10):
    """The student's one DDIM step t -> t'' from x~ lands where the teacher's two DDIM steps (the registered euler
    solver on the 3-point grid) land."""
    euler, schedule = SOLVERS["euler"].fn, teacher.schedule
    target, _ = progressive_target(teacher.denoise, z, i, grid, schedule, cond)
    for k in i.unique().tolist():
        m = i == k
        c = None if cond is None else cond[m]
        two = euler(teacher.denoise, z[m], grid[2 * k:2 * k + 3], schedule=schedule, cond=c)
        one = euler(lambda x, t, c_: target[m], z[m], grid[2 * k:2 * k + 3:2], schedule=schedule)
        scale = two.abs().max().item() + 1.0
        assert (one - two).abs().max().item() <= tol * scale, (k, (one - two).abs().max().item())
    return target


@pytest.mark.parametrize("schedule", ["vp_linear", "edm", "rectified_flow"])
def test_target_equals_two_teacher_ddim_steps_on_an_analytic_teacher(schedule):
    teacher = load_teacher(f"gmm:ring8@{schedule}")
    grid = teacher_grid(teacher, 8, "logsnr")
    g = torch.Generator().manual_seed(0)
    i = torch.arange(4).repeat(4)  # every student interval, the last one (into clean data) included
    x0, eps = teacher.sample_data(len(i), g), torch.randn(len(i), 2, generator=g, dtype=torch.float64)
    from distill.objectives.losses import add_noise

    z = add_noise(teacher.schedule, x0, eps, grid[2 * i])
    target = _check_two_steps_in_one(teacher, z, i, grid)
    last = i == 3  # the last step goes to clean data: the target is the teacher's data prediction at t'
    z1 = SOLVERS["euler"].fn(teacher.denoise, z[last], grid[6:8], schedule=teacher.schedule)
    assert torch.equal(target[last], teacher.denoise(z1, grid[7]))


def test_target_equals_two_teacher_ddim_steps_on_the_mnist16_teacher():
    teacher = load_teacher("mnist16").to(dtype=torch.float64)
    grid = teacher_grid(teacher, 16, "uniform")
    g = torch.Generator().manual_seed(1)
    i = torch.tensor([0, 3, 7, 7])
    z = torch.randn(4, 1, 16, 16, generator=g, dtype=torch.float64)
    cond = torch.tensor([1, 5, -1, 9])
    _check_two_steps_in_one(teacher, z, i, grid, cond, tol=1e-12)


def test_loss_weights_are_the_papers():
    a, s = torch.tensor([0.6, 0.995]), torch.tensor([0.8, 0.0999])
    snr = (a / s) ** 2
    assert torch.allclose(loss_weight("snr_trunc", a, s), torch.stack([torch.tensor(1.0), snr[1]]))
    assert torch.allclose(loss_weight("v_mse", a, s), snr + 1) and torch.equal(loss_weight("snr", a, s), snr)


def test_options_are_validated_with_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match="refuses an eps-parameterized student: x = .* blows up as alpha -> 0"):
        run(tiny_cfg(tmp_path / "eps", "student.prediction_type=epsilon"))
    with pytest.raises(ConfigError, match="refuses an eps-parameterized student"):
        run(tiny_cfg(tmp_path / "eps2", "objective.parameterization=eps"))
    with pytest.raises(ConfigError, match="'objective.parameterization' is 'v' but the student network predicts 'sample'"):
        run(tiny_cfg(tmp_path / "v", "objective.parameterization=v"))
    with pytest.raises(ConfigError, match="deterministic DDIM student: set student.sampler 'ode'"):
        run(tiny_cfg(tmp_path / "cm", "student.sampler=consistency"))
    with pytest.raises(ConfigError, match="objective.weighting.*allowed: constant, snr, snr_trunc, v_mse"):
        run(tiny_cfg(tmp_path / "w", "objective.weighting=snr_plus"))


@pytest.mark.parametrize("param", ["x", "v", "both"])
def test_each_parameterization_trains_and_the_file_records_its_grid(tmp_path, param):
    prediction = {"x": "sample", "v": "v_prediction", "both": "both"}[param]
    out = run(tiny_cfg(tmp_path / param, f"student.prediction_type={prediction}", f"objective.parameterization={param}",
                       "max_steps=4"))
    student = load_student(out / "student.safetensors")
    grid = teacher_grid(load_teacher("gmm:ring8"), 8, "logsnr")[::2]
    assert student.sampling_steps == (4,) and student.sampling_timesteps(4).tolist() == grid[:-1].tolist()
    noise = torch.randn(5, 2)
    ref = SOLVERS["euler"].fn(student.denoise, noise.clone(), explicit_grid(student.schedule, grid[:-1]), schedule=student.schedule)
    assert torch.equal(student.sample(noise, 4), ref)  # deterministic DDIM on its own grid, no re-noising


def test_progressive_run_resumes_bit_identically(tmp_path):
    full = run(tiny_cfg(tmp_path / "full", "max_steps=10"))
    assert run(tiny_cfg(tmp_path / "killed", "max_steps=10"), stop_at=6) is None
    run(tiny_cfg(tmp_path / "killed", "max_steps=10"), resume="latest")
    assert same_tensors(full / "student.safetensors", tmp_path / "killed" / "student.safetensors")



# -- the halving rounds (scripts/progressive.py) ------------------------------------------------------------
ROUND_SETS = [*TINY, "max_steps=8", "checkpoint_every=3"]


def _rounds(out, **kw):
    from conftest import load_script

    from distill.engine.config import parse_overrides

    return load_script("progressive").run_rounds(str(CONFIG), out, parse_overrides(ROUND_SETS), 1, log=lambda m: None, **kw)


def test_rounds_halve_chain_teachers_and_record_lineage(tmp_path):
    files = _rounds(tmp_path / "chain")
    assert [f.parent.name for f in files] == ["steps-4", "steps-2", "steps-1"]
    from distill.engine.train import file_sha256

    for parent, child in zip(files, files[1:]):
        s = load_student(child)
        n = s.sampling_steps[0]
        assert s.info["lineage"] == {"init_from": str(parent), "sha256": file_sha256(parent)}
        assert s.info["teacher_hash"] == file_sha256(parent)  # the previous student taught it
        # its grid is every other point of its teacher's (which is the parent's own grid)
        assert s.sampling_timesteps(n).tolist() == load_student(parent).sampling_timesteps(2 * n)[::2].tolist()
    import json

    rows = json.loads((tmp_path / "chain" / "rounds.json").read_text())
    assert [r["student_steps"] for r in rows] == [4, 2, 1] and all(r["updates"] == 8 for r in rows)
    # every round's file records the chain's first teacher, so the bench takes the last student for that teacher
    from distill.eval.bench import check_student

    root = load_teacher("gmm:ring8")
    last = load_student(files[-1])
    assert last.info["root_teacher_hash"] == root.hash and last.info["teacher_hash"] != root.hash
    check_student(root, "pd-1", last)
    with pytest.raises(ValueError, match="allow-other-teacher"):
        check_student(load_teacher("gmm:aniso2d"), "pd-1", last)
    # a file from before the key: the root is found through its parent files while they are on disk, and a
    # parent that changed since is not followed
    from distill.engine.lineage import root_teacher

    old = {k: v for k, v in last.info.items() if k not in ("root_teacher_hash", "root_teacher")}
    assert root_teacher(old)[1] == root.hash
    assert root_teacher({**old, "teacher_hash": "0" * 64})[1] == "0" * 64
    # the chain's files copied side by side elsewhere (the run folder gone): parents are found by hash in that folder
    import shutil

    shelf = tmp_path / "shelf"
    shelf.mkdir()
    for f in files:
        shutil.copy(f, shelf / f"pd_{f.parent.name}.safetensors")
    moved = {**old, "teacher": "student:/nonexistent/student.safetensors"}
    assert root_teacher(moved)[1] == old["teacher_hash"]  # nothing to follow
    assert root_teacher(moved, near=shelf)[1] == root.hash


def test_rounds_killed_mid_round_continue_bit_identically(tmp_path):
    full = _rounds(tmp_path / "full")
    out = tmp_path / "killed"
    assert _rounds(out, stop_at=(2, 4)) == [out / "steps-4" / "student.safetensors"]  # stopped in round 2, step 4
    assert not (out / "steps-2" / "student.safetensors").exists() and (out / "steps-2" / "checkpoints" / "step-4").is_dir()
    resumed = _rounds(out)
    for a, b in zip(full, resumed):
        assert same_tensors(a, b), b
    from distill.engine.train import file_sha256

    # the resumed round's file still records its parent (the engine re-derives the lineage on resume)
    assert load_student(resumed[1]).info["lineage"] == {"init_from": str(resumed[0]), "sha256": file_sha256(resumed[0])}


def test_rounds_cli_after_a_sigkill_mid_round(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from distill_helpers import subprocess_env

    out = tmp_path / "cli"
    cmd = [sys.executable, str(ROOT / "scripts" / "progressive.py"), "--config", str(CONFIG), "--output-dir", str(out),
           "--set", *TINY, "max_steps=60", "checkpoint_every=5"]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "steps-2" / "checkpoints" / "step-10").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()
    assert not (out / "steps-2" / "student.safetensors").exists()
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "round 1 (4 steps): done" in done.stdout and "round 2 (4 -> 2 steps): resuming" in done.stdout
    assert (out / "steps-1" / "student.safetensors").is_file()
