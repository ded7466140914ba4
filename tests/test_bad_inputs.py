"""Bad inputs and damaged files through the real command-line tools (issue #14): each case ends with one sentence
naming the problem, and no file that existed before the command changed. Tiny models and gmm teachers."""

import csv
import hashlib
import os
from pathlib import Path

import pytest
import torch
from conftest import load_script
from distill_helpers import RING8, TINY, run, same_tensors, tiny_cfg

from distill.core.atomic import OutputWriteError
from distill.engine.checkpoint import MANIFEST
from distill.engine.export import save_student
from distill.engine.run_config import StudentConfig
from students import build_student
from teachers import load_teacher


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (a file root: itself), by path."""
    files = [p for r in roots for p in ([r] if r.is_file() else sorted(r.rglob("*"))) if p.is_file()]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def refused(main, argv, capsys) -> str:
    """Run a CLI's main; it must stop (exit status 1 or SystemExit) and the sentence it printed is returned."""
    try:
        code = main(argv)
    except SystemExit as e:
        code, message = e.code, e.code if isinstance(e.code, str) else ""
    else:
        message = ""
    assert code not in (0, None), "the command was expected to refuse"
    return message + capsys.readouterr().err


def distill_argv(out: Path, *sets: str, config: Path = RING8) -> list[str]:
    return ["--config", str(config), "--output-dir", str(out), "--set", *TINY, *sets]


# -- damaged checkpoints -------------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


DAMAGE = {
    "garbage manifest": (lambda c: (c / MANIFEST).write_text("\x00garbage"), "not valid JSON"),
    "empty manifest": (lambda c: (c / MANIFEST).write_text(""), "manifest.json is empty"),
    "missing student file": (lambda c: (c / "student.safetensors").unlink(), "student.safetensors is missing"),
    "truncated model file": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors has 200 bytes"),
}


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A run stopped after its step-8 checkpoint (step-4 before it), as a kill would leave it."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    assert run(tiny_cfg(out, "keep_checkpoints=3"), stop_at=8) is None
    return out


@pytest.mark.parametrize("case", list(DAMAGE))
def test_export_skips_a_damaged_newest_checkpoint_with_a_sentence(interrupted_run, tmp_path, capsys, case):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(interrupted_run, out)
    damage, reason = DAMAGE[case]
    damage(out / "checkpoints" / "step-8")
    before = snapshot(out)
    assert load_script("export").main([str(out), "--out", str(tmp_path / "s.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert f"note: skipped checkpoint {str(out / 'checkpoints' / 'step-8')!r}" in printed and reason in printed
    assert same_tensors(tmp_path / "s.safetensors", out / "checkpoints" / "step-4" / "student.safetensors")
    assert snapshot(out) == before


def test_resume_falls_back_past_a_damaged_checkpoint_and_ends_bit_identical(interrupted_run, tmp_path, capsys):
    import shutil

    killed, full = tmp_path / "killed", tmp_path / "full"
    shutil.copytree(interrupted_run, killed)
    _truncate(killed / "checkpoints" / "step-8" / "model.safetensors")
    assert load_script("distill").main(distill_argv(killed, "keep_checkpoints=3") + ["--resume", "latest"]) == 0
    assert f"resumed from {killed / 'checkpoints' / 'step-4'} at step 4" in capsys.readouterr().out
    run(tiny_cfg(full, "keep_checkpoints=3"))
    for name in ("student.safetensors", "student_ema.safetensors"):
        assert same_tensors(full / name, killed / name), name


# -- configs -------------------------------------------------------------------------------------------
def test_yaml_syntax_error_names_the_file_and_line(tmp_path, existing, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: gmm:ring8\nobjective:\n  name: consistency\n   num_scales: 6\n")
    before = snapshot(existing)
    message = refused(load_script("distill").main, distill_argv(existing, config=bad), capsys)
    assert f"{bad} is not valid YAML" in message and "line 4" in message
    assert snapshot(existing) == before


def test_exponent_literals_are_floats_on_the_command_line_and_in_yaml(tmp_path):
    import yaml

    config = tmp_path / "exp.yaml"
    config.write_text(RING8.read_text().replace("lr: 0.001", "lr: 5E-3"))
    main = load_script("distill").main
    assert main(distill_argv(tmp_path / "a", "max_steps=2", config=config)) == 0
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["optim"]["lr"] == 0.005
    assert main(distill_argv(tmp_path / "b", "max_steps=2", "optim.lr=1e-4", "grad_clip=1e30")) == 0
    saved = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 1e-4 and saved["grad_clip"] == 1e30
    # a string field keeps a string that looks like a number
    from distill.engine.config import parse_overrides
    from distill.engine.run_config import load_run_config
    assert load_run_config(RING8, parse_overrides(["output_dir=1e5"])).output_dir == "1e5"


def test_unknown_student_model_key_names_the_allowed_ones(existing, capsys):
    before = snapshot(existing)
    message = refused(load_script("distill").main, distill_argv(existing, "student.model.hiden=16"), capsys)
    assert ("unknown student.model key(s) hiden for student arch 'mlp' (TimeMLP); allowed: hidden, layers, "
            "out_dim, time_features, time_scale") in message
    assert snapshot(existing) == before


# -- sample.py -----------------------------------------------------------------------------------------
def sample_argv(out, *extra):
    return ["--teacher", "gmm:ring8", "--solver", "euler", "--nfe", "2", "--n", "8", "--out", str(out), *extra]


def test_sample_out_is_a_file(existing, capsys):
    target = existing / "keep.txt"
    before = snapshot(existing)
    message = refused(load_script("sample").main, sample_argv(target), capsys)
    assert f"--out {str(target)!r} is a file, but a folder is expected there" in message
    assert snapshot(existing) == before


def test_sample_output_file_is_a_folder(existing, capsys):
    (existing / "samples.safetensors").mkdir()
    before = snapshot(existing)
    message = refused(load_script("sample").main, sample_argv(existing), capsys)
    assert "holds a folder 'samples.safetensors' where the file 'samples.safetensors' is to be written" in message
    assert snapshot(existing) == before and not (existing / "samples.png").exists()


def test_sample_out_below_a_file(existing, capsys):
    message = refused(load_script("sample").main, sample_argv(existing / "keep.txt" / "sub"), capsys)
    assert f"{str(existing / 'keep.txt')!r} is a file, not a folder" in message


def test_sample_into_a_read_only_folder(existing, capsys, monkeypatch):
    """chmod does not stop root, so the read-only answer of os.access is simulated for that one folder."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == existing else real_access(p, mode))
    before = snapshot(existing)
    message = refused(load_script("sample").main, sample_argv(existing / "new"), capsys)
    assert f"cannot be written: the folder {str(existing)!r} is read-only" in message
    assert snapshot(existing) == before and not (existing / "new").exists()


def test_sample_batch_size_zero(tmp_path, capsys):
    message = refused(load_script("sample").main, sample_argv(tmp_path / "o", "--batch-size", "0"), capsys)
    assert "--batch-size must be at least 1, got 8, 2 and 0" in message
    assert not (tmp_path / "o").exists()


def test_sample_guidance_with_the_unconditional_label_is_refused(tmp_path, capsys):
    message = refused(load_script("sample").main, sample_argv(tmp_path / "o", "--class-label", "-1", "--guidance-scale", "3"), capsys)
    assert "--guidance-scale with --class-label -1 (unconditional) changes nothing" in message and "0..7" in message
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("label", ["0", "-1"])
def test_sample_guidance_with_an_unconditional_teacher_is_refused(tmp_path, make_teacher_folder, capsys, label):
    folder, _, _ = make_teacher_folder()
    argv = ["--teacher", str(folder), "--solver", "euler", "--nfe", "2", "--n", "2", "--out", str(tmp_path / "o"),
            "--class-label", label, "--guidance-scale", "3"]
    message = refused(load_script("sample").main, argv, capsys)
    assert "--guidance-scale needs a class-conditional teacher" in message and "(drop --guidance-scale)" in message
    assert not (tmp_path / "o").exists()


# -- export.py -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp_student_file(tmp_path_factory):
    """An untrained mlp student of gmm:aniso2d, saved as a student file."""
    path = tmp_path_factory.mktemp("student") / "aniso.safetensors"
    torch.manual_seed(0)
    student = build_student(StudentConfig(arch="mlp", model={"hidden": 16, "layers": 1}), load_teacher("gmm:aniso2d"))
    return save_student(student, path)


def test_export_out_is_a_folder_leaves_no_tmp(mlp_student_file, existing, capsys):
    before = snapshot(existing)
    message = refused(load_script("export").main, [str(mlp_student_file), "--out", str(existing)], capsys)
    assert f"--out {str(existing)!r} is a folder, but a file is expected there" in message
    assert snapshot(existing) == before and not Path(str(existing) + ".tmp").exists()


def test_export_out_below_a_file(mlp_student_file, existing, capsys):
    out = existing / "keep.txt" / "s.safetensors"
    message = refused(load_script("export").main, [str(mlp_student_file), "--out", str(out)], capsys)
    assert f"{str(existing / 'keep.txt')!r} is a file, not a folder" in message
    assert not Path(str(out) + ".tmp").exists() and not (existing / "keep.txt.tmp").exists()


def test_export_diffusers_of_an_mlp_student_writes_nothing(mlp_student_file, existing, capsys):
    out, folder = existing / "s.safetensors", existing / "diffusers"
    before = snapshot(existing)
    message = refused(load_script("export").main, [str(mlp_student_file), "--out", str(out), "--diffusers", str(folder)], capsys)
    assert "only diffusers networks can be saved as a diffusers folder (--diffusers), not TimeMLP" in message
    assert snapshot(existing) == before and not out.exists() and not folder.exists()


def test_save_student_removes_its_tmp_when_the_rename_fails(mlp_student_file, existing):
    from students import load_student

    with pytest.raises(OutputWriteError, match="a folder is in the way"):
        save_student(load_student(mlp_student_file), existing)  # a folder: the write succeeds, the rename cannot
    assert not Path(str(existing) + ".tmp").exists() and not [p for p in existing.parent.iterdir() if ".tmp" in p.name]


# -- make_trajectories.py ------------------------------------------------------------------------------
def test_make_trajectories_out_is_a_file(existing, capsys):
    before = snapshot(existing)
    argv = ["--teacher", "gmm:ring8", "--solver", "euler", "--nfe", "2", "--num-samples", "8", "--out", str(existing / "keep.txt")]
    message = refused(load_script("make_trajectories").main, argv, capsys)
    assert f"--out {str(existing / 'keep.txt')!r} is a file, but a folder is expected there" in message
    assert snapshot(existing) == before


# -- bench.py ------------------------------------------------------------------------------------------
def bench_argv(out, *extra):
    return ["--teacher", "gmm:ring8", "--unconditional", "--solvers", "euler", "--nfe", "1", "--num-samples", "8",
            "--reference-steps", "10", "--out", str(out), *extra]


def test_bench_out_is_a_file(existing, capsys):
    before = snapshot(existing)
    message = refused(load_script("bench").main, bench_argv(existing / "keep.txt"), capsys)
    assert f"--out {str(existing / 'keep.txt')!r} is a file, but a folder is expected there" in message
    assert snapshot(existing) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_bench_device_cuda_without_a_gpu(tmp_path, capsys):
    message = refused(load_script("bench").main, bench_argv(tmp_path / "o", "--device", "cuda"), capsys)
    assert "--device cuda needs a GPU, but torch sees none; use --device cpu" in message
    assert not (tmp_path / "o").exists()


def test_bench_refuses_a_student_of_another_teacher(mlp_student_file, tmp_path, capsys):
    argv = bench_argv(tmp_path / "o", "--students", str(mlp_student_file), "--student-steps", "1")
    message = refused(load_script("bench").main, argv, capsys)
    ring8, aniso = load_teacher("gmm:ring8").hash, load_teacher("gmm:aniso2d").hash
    assert (f"student 'aniso' was distilled from 'gmm:aniso2d' (teacher hash {aniso[:12]}), not from the bench teacher "
            f"'gmm:ring8' ({ring8[:12]}); pass --allow-other-teacher") in message
    assert not (tmp_path / "o").exists()
    assert load_script("bench").main(argv + ["--allow-other-teacher"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "o" / "fid_vs_nfe.csv")))
    student_rows = [r for r in rows if r["kind"] == "student"]
    assert [(r["teacher_hash"], r["student_teacher_hash"]) for r in student_rows] == [(ring8, aniso)]


# -- tune_steps.py, train_classifier.py ------------------------------------------------------------------
def test_tune_steps_batch_size_zero(mlp_student_file, tmp_path, capsys):
    argv = [str(mlp_student_file), "--out", str(tmp_path / "t.safetensors"), "--num-samples", "4", "--batch-size", "0"]
    message = refused(load_script("tune_steps").main, argv, capsys)
    assert "--batch-size >= 1, got 4, 16 and 0" in message and not (tmp_path / "t.safetensors").exists()


def test_tune_steps_out_is_a_folder(mlp_student_file, existing, capsys):
    before = snapshot(existing)
    message = refused(load_script("tune_steps").main, [str(mlp_student_file), "--out", str(existing), "--num-samples", "4"], capsys)
    assert f"--out {str(existing)!r} is a folder, but a file is expected there" in message
    assert snapshot(existing) == before


def test_train_classifier_batch_size_zero(tmp_path, capsys):
    message = refused(load_script("train_classifier").main, ["--batch-size", "0", "--out", str(tmp_path / "c.safetensors")], capsys)
    assert "--epochs and --batch-size must be at least 1, got 30 and 0" in message
    assert not (tmp_path / "c.safetensors").exists()


# -- the trainer's own guards (resume, max_steps, metrics, guidance) ------------------------------------------
TEACHER_TINY = ["student.model={hidden: 16, layers: 1}", "batch_size=16", "max_steps=4", "checkpoint_every=2", "log_every=2"]


def test_train_teacher_no_resume_into_a_folder_with_checkpoints_is_refused(tmp_path, capsys):
    main = load_script("train_teacher").main
    cfg = str(Path(__file__).resolve().parents[1] / "configs" / "teachers" / "ring8_mlp.yaml")
    out = tmp_path / "t"
    assert main(["--config", cfg, "--output-dir", str(out), "--set", *TEACHER_TINY]) == 0
    before = snapshot(out)
    message = refused(main, ["--config", cfg, "--output-dir", str(out), "--no-resume", "--set", *TEACHER_TINY, "max_steps=2"], capsys)
    assert "already has checkpoints" in message and snapshot(out) == before
    message = refused(main, ["--config", cfg, "--output-dir", str(out), "--set", *TEACHER_TINY, "optim.lr=0.01", "max_steps=6"], capsys)
    assert "differs from the one checkpoint" in message and "in optim.lr (" in message and snapshot(out) == before
    for script, extra in (("train_teacher", ["--config", cfg, "--set", *TEACHER_TINY]), ("distill", distill_argv(tmp_path / "d"))):
        message = refused(load_script(script).main, [*extra, "--output-dir", str(tmp_path / "zero"), "--max-steps", "0"], capsys)
        assert "'max_steps' must be at least 1, got 0" in message


def test_partial_metrics_line_is_dropped_with_a_note(tmp_path):
    out = tmp_path / "r"
    assert run(tiny_cfg(out, "max_steps=8"), stop_at=4) is None
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "netw')  # what a kill mid-write leaves
    messages = []
    run(tiny_cfg(out, "max_steps=8"), resume="latest", log=messages.append)
    assert any("dropped an unreadable line" in m for m in messages)
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [__import__("json").loads(r)["step"] for r in rows] == [2, 4, 6, 8]


def test_guidance_with_an_unconditional_teacher_names_the_key_before_any_file(tmp_path, capsys):
    from conftest import save_teacher_folder
    from diffusers import DDPMScheduler

    from teachers.toy_mlp import ToyMLP

    teacher = save_teacher_folder(tmp_path / "uncond", ToyMLP(dim=2, hidden=8, layers=1), DDPMScheduler())
    out = tmp_path / "g"
    message = refused(load_script("distill").main, distill_argv(out, f"teacher={teacher}", "objective.guidance_scale=2.0"), capsys)
    assert "'objective.guidance_scale' needs a class-conditional teacher with an unconditional mode" in message
    assert not out.exists()
