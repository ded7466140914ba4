"""Bad inputs to the newer command-line tools (issue #32), through their real ``main``: each case ends with one sentence
naming the problem and the allowed values, a non-zero exit, no traceback, and no file changed or left behind
(``<out>.tmp``, ``<out>.state.pt``). Tiny inputs: gmm teachers, untrained mlp students, hand-written CSVs."""

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import load_script
from distill_helpers import RING8, TINY
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_bad_inputs import refused

from distill.engine.export import save_student
from distill.engine.run_config import StudentConfig
from distill.eval.bench import FIELDS
from distill.eval.solver_error import write_rows
from students import build_student
from teachers import load_teacher


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder): a refused command changes and adds nothing."""
    return {str(p): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def aniso_student(tmp_path_factory):
    """An untrained mlp student of gmm:aniso2d, saved as a student file."""
    path = tmp_path_factory.mktemp("student") / "aniso.safetensors"
    torch.manual_seed(0)
    student = build_student(StudentConfig(arch="mlp", model={"hidden": 16, "layers": 1}), load_teacher("gmm:aniso2d"))
    return save_student(student, path)


def with_metadata(src: Path, dst: Path, **changes: str) -> Path:
    """A copy of a student file with some metadata fields replaced."""
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    save_file(load_file(str(src)), str(dst), metadata={**meta, **changes})
    return dst


# -- output paths, checked before any work ---------------------------------------------------------------
# (script, argv before --out, the output option, a file (True) or a folder (False))
OUTPUTS = {
    "run_cost": (["nowhere", "--hardware", "cpu", "--teacher-nfe-per-step", "1"], "--out", True),
    "consistency_error": (["--teacher", "gmm:ring8", "--students", "teacher", "--dataset", "ring8"], "--out", False),
    "leaderboard": (["--results", "nowhere"], "--out", True),
    "compute_ems": (["--teacher", "gmm:aniso2d", "--n-lams", "4", "--num-samples", "8"], "--out", True),
    "gits_search": (["--teacher", "gmm:aniso2d", "--steps", "2", "--num-samples", "4", "--fine-steps", "4"], "--out", True),
    "train_amed": (["--teacher", "gmm:aniso2d", "--nfe", "2", "--batch-size", "4", "--num-batches", "1"], "--out", True),
    "style_stats": (["--teacher", "gmm:ring8", "--students", "a=a.safetensors"], "--out", False),
    "fidelity_cli": (["--input1", "a", "--input2", "b", "--fid"], "--cache-root", False),
}


def _main(script: str):
    if script == "fidelity_cli":
        from distill.eval.fidelity_cli import main

        return main
    return load_script(script).main


@pytest.mark.parametrize("script", list(OUTPUTS))
def test_output_of_the_wrong_kind_is_refused_before_any_work(existing, capsys, script):
    argv, option, is_file = OUTPUTS[script]
    target = existing if is_file else existing / "keep.txt"
    before = tree(existing)
    message = refused(_main(script), [*argv, option, str(target)], capsys)
    kind = "is a folder, but a file is expected there" if is_file else "is a file, but a folder is expected there"
    assert f"{option} {str(target)!r} {kind}" in message and "Traceback" not in message
    assert tree(existing) == before and not Path(str(target) + ".tmp").exists()


@pytest.mark.parametrize("script", list(OUTPUTS))
def test_output_in_a_read_only_folder_is_refused_before_any_work(existing, capsys, monkeypatch, script):
    """chmod does not stop root, so the read-only answer of os.access is simulated for that one folder."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == existing else real_access(p, mode))
    argv, option, is_file = OUTPUTS[script]
    target = existing / ("new.out" if is_file else "new")
    before = tree(existing)
    message = refused(_main(script), [*argv, option, str(target)], capsys)
    assert f"{option} {str(target)!r} cannot be written: the folder {str(existing)!r} is read-only" in message
    assert tree(existing) == before


@pytest.mark.parametrize("script", ["compute_ems", "gits_search", "train_amed"])
def test_a_folder_where_the_resume_state_goes_is_refused(existing, capsys, script):
    argv, option, _ = OUTPUTS[script]
    out = existing / "prepared.out"
    (existing / "prepared.out.state.pt").mkdir()
    before = tree(existing)
    message = refused(_main(script), [*argv, option, str(out)], capsys)
    assert f"the state file of --out {str(existing / 'prepared.out.state.pt')!r} is a folder" in message
    assert tree(existing) == before


# -- style_stats.py: refusals are sentences, not tracebacks ------------------------------------------------
@pytest.mark.parametrize("bad, sentence", [
    (["--student-steps", "0"], "cannot parse --student-steps '0': expected comma-separated positive integers"),
    (["--students", "nameless.safetensors"], "cannot parse --students 'nameless.safetensors': expected comma-separated name=path"),
    (["--target-options", "fraction=lots"], "cannot parse --target-options 'fraction=lots': expected key=value items"),
    (["--bench-csv", "missing.csv"], "no bench CSV at missing.csv (--bench-csv)"),
])
def test_style_stats_refusals_are_one_sentence(tmp_path, capsys, bad, sentence):
    argv = ["--teacher", "gmm:ring8", "--students", "a=a.safetensors", "--dataset", "ring8", "--target-options", "",
            "--out", str(tmp_path / "o")]
    message = refused(load_script("style_stats").main, argv + bad, capsys)
    assert message.startswith("error: ") and sentence in message and "Traceback" not in message
    assert not (tmp_path / "o").exists()


def test_style_stats_missing_student_file_is_one_sentence(tmp_path, capsys):
    argv = ["--teacher", "gmm:ring8", "--students", f"a={tmp_path / 'a.safetensors'}", "--dataset", "ring8",
            "--target-options", "", "--out", str(tmp_path / "o")]
    message = refused(load_script("style_stats").main, argv, capsys)
    assert f"student file {str(tmp_path / 'a.safetensors')!r} does not exist" in message and not (tmp_path / "o").exists()


# -- values accepted without effect or with a wrong one -----------------------------------------------------
def fake_run(folder: Path) -> Path:
    """A run folder as run_cost reads it: config.yaml, 10 logged steps, an exported student."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("batch_size: 8\n")
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 10, "network": "student", "seconds_per_step": 0.1}) + "\n")
    save_file({"w": torch.zeros(3)}, str(folder / "student.safetensors"))
    return folder


@pytest.mark.parametrize("up_to", ["0", "-3"])
def test_run_cost_up_to_must_be_a_positive_step(tmp_path, capsys, up_to):
    run, out = fake_run(tmp_path / "run"), tmp_path / "s.cost.json"
    argv = [str(run), "--hardware", "cpu", "--teacher-nfe-per-step", "1", "--up-to", up_to, "--out", str(out)]
    message = refused(load_script("run_cost").main, argv, capsys)
    assert f"--up-to must be a positive step of the last run (the checkpoint's step), got {up_to}; allowed: 1" in message
    assert not out.exists()


def test_train_amed_without_batches_is_refused(tmp_path, capsys):
    out = tmp_path / "amed.safetensors"
    argv = ["--teacher", "gmm:aniso2d", "--nfe", "2", "--batch-size", "4", "--num-batches", "0", "--out", str(out)]
    message = refused(load_script("train_amed").main, argv, capsys)
    assert "AMED setting num_batches (--num-batches) is 0; allowed: at least 1" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("coeff", ["nan", "inf", "0", "-1.15"])
def test_gits_coeff_must_be_a_finite_positive_weight(tmp_path, capsys, coeff):
    argv = ["--teacher", "gmm:aniso2d", "--steps", "2", "--num-samples", "4", "--fine-steps", "4", "--coeff", coeff,
            "--out", str(tmp_path / "gits.json")]
    message = refused(load_script("gits_search").main, argv, capsys)
    assert f"--coeff is {float(coeff)}; allowed: a finite number > 0" in message and "(GITS: 1.15)" in message
    assert list(tmp_path.iterdir()) == []


CONFIG = {"num_samples": "8", "seed": "0", "guidance_scale": "", "grid": "uniform", "final": "direct", "labels": "none",
          "teacher_hash": "abc", "reference_id": "ref", "protocol": "2"}


def bench_csv(folder: Path, teacher: str, key: str) -> Path:
    """A bench folder whose cells carry ``key`` (fid: an image teacher's; swd: an analytic teacher's)."""
    rows = [{"kind": "solver", "method": m, "nfe": str(n), "steps": str(n), key: str(v), "teacher": teacher, **CONFIG}
            for m, n, v in (("euler", 1, 5.0), ("heun", 2, 3.0), ("euler", 2, 4.0))]
    write_rows(folder / "fid_vs_nfe.csv", rows, FIELDS)
    return folder


def test_leaderboard_readme_rows_must_be_positive(tmp_path, capsys):
    results = bench_csv(tmp_path, "mnist16", "fid")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- leaderboard: generated by scripts/leaderboard.py -->\nold\n<!-- /leaderboard -->\n")
    before = tree(tmp_path)
    argv = ["--results", str(results), "--out", str(tmp_path / "LEADERBOARD.md"), "--readme", str(readme), "--readme-rows", "-1"]
    message = refused(load_script("leaderboard").main, argv, capsys)
    assert "--readme-rows must be at least 1 (table rows shown in the README), got -1" in message
    assert tree(tmp_path) == before


def test_leaderboard_of_an_analytic_teacher_is_refused(tmp_path, capsys):
    results = bench_csv(tmp_path, "gmm:ring8", "swd")
    before = tree(tmp_path)
    message = refused(load_script("leaderboard").main, ["--results", str(results), "--out", str(tmp_path / "L.md")], capsys)
    assert ("the bench of teacher 'gmm:ring8' has no FID (an analytic teacher's cells are scored by swd, ode_rmse and nll) "
            "and the leaderboard ranks by FID; allowed: a bench of an image teacher") in message
    assert tree(tmp_path) == before


def test_leaderboard_tie_count_ignores_cells_without_fid(tmp_path):
    from distill.eval.bench import read_bench_rows
    from distill.eval.leaderboard import leaderboard_rows

    rows = read_bench_rows(bench_csv(tmp_path, "mnist16", "fid") / "fid_vs_nfe.csv")
    rows.append({**rows[0], "method": "dpmpp_2m", "fid": ""})  # a cell of no FID at 1 NFE is not 'the same samples'
    labels = [label for label, _ in leaderboard_rows(rows)]
    assert "best solver at 1 NFE: `euler`" in labels and not any("-1 other" in label for label in labels)


def bench_argv(out, *extra, teacher="gmm:ring8"):
    return ["--teacher", teacher, "--unconditional", "--solvers", "euler", "--nfe", "1", "--num-samples", "8",
            "--reference-steps", "10", "--out", str(out), *extra]


@pytest.mark.parametrize("variant, solver, allowed", [
    ("v=euler:foo=1", "euler", "grid, final, teleport, handoff_sigma, sigma_max"),
    ("v=dpm_solver_v3:orders=2", "dpm_solver_v3", "grid, final, teleport, handoff_sigma, sigma_max, ems, order, p_pseudo"),
    ("v=ddpm:noises=1", "ddpm", "grid, final, teleport, handoff_sigma, sigma_max"),  # the bench draws a stochastic step's noise
])
def test_bench_variant_option_names_are_checked(tmp_path, capsys, variant, solver, allowed):
    message = refused(load_script("bench").main, bench_argv(tmp_path / "o", "--variant", variant), capsys)
    key = variant.split(":")[1].split("=")[0]
    assert f"unknown option {key!r} of --variant v for solver {solver!r}; allowed: {allowed}" in message
    assert not (tmp_path / "o").exists()


def test_sample_names_an_unknown_solver_option():
    from distill.solvers import sample

    with pytest.raises(ValueError, match="unknown option 'orders' for solver 'unipc'; allowed: grid, .*, order, variant"):
        sample(load_teacher("gmm:ring8"), torch.zeros(2, 2), solver="unipc", nfe=2, orders=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_compute_ems_device_cuda_without_a_gpu(tmp_path, capsys):
    out = tmp_path / "ems.safetensors"
    argv = ["--teacher", "gmm:aniso2d", "--n-lams", "4", "--num-samples", "8", "--device", "cuda", "--out", str(out)]
    message = refused(load_script("compute_ems").main, argv, capsys)
    assert "--device cuda needs a GPU, but torch sees none; use --device cpu" in message
    assert list(tmp_path.iterdir()) == []


def test_consistency_error_refuses_a_student_of_another_teacher(aniso_student, tmp_path, capsys):
    argv = ["--teacher", "gmm:ring8", "--students", f"s={aniso_student}", "--dataset", "ring8", "--split", "train",
            "--times", "0.5", "--num-samples", "4", "--reference-steps", "2", "--out", str(tmp_path / "o")]
    main = load_script("consistency_error").main
    message = refused(main, argv, capsys)
    ring8, aniso = load_teacher("gmm:ring8").hash, load_teacher("gmm:aniso2d").hash
    assert (f"student 's' was distilled from 'gmm:aniso2d' (teacher hash {aniso[:12]}), not from the reference teacher "
            f"'gmm:ring8' ({ring8[:12]}); pass --allow-other-teacher to measure it anyway") in message
    assert not (tmp_path / "o").exists()
    assert main(argv + ["--allow-other-teacher"]) == 0
    assert {r["student"] for r in csv.DictReader(open(tmp_path / "o" / "consistency_error.csv"))} == {"s"}


@pytest.mark.parametrize("cost, field", [
    ({"steps": -5, "batch_size": 8}, "cost field 'steps' = -5; allowed: a number >= 0"),
    ({"steps": 5, "wall_seconds": "an hour"}, "cost field 'wall_seconds' = 'an hour'; allowed: a number >= 0"),
    ({"steps": 5, "teacher_nfe": True}, "cost field 'teacher_nfe' = True; allowed: a number >= 0"),
    ({"steps": 5, "hardware": 3}, "cost field 'hardware' = 3; allowed: a text naming the hardware"),
    ("not json{", "is not valid JSON (Expecting value: line 1 column 1 (char 0))"),
])
def test_bench_refuses_a_bad_cost_file_naming_it(aniso_student, tmp_path, capsys, cost, field):
    path = tmp_path / "s.cost.json"
    path.write_text(cost if isinstance(cost, str) else json.dumps(cost))
    argv = bench_argv(tmp_path / "o", "--students", str(aniso_student), "--student-steps", "1", "--cost", str(path),
                      teacher="gmm:aniso2d")
    message = refused(load_script("bench").main, argv, capsys)
    assert f"cost file {str(path)!r} " in message and field in message
    assert not (tmp_path / "o").exists()


def test_bench_refuses_a_damaged_teacher_cost_before_any_cell(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "teacher_cost.json").write_text(json.dumps({"wall_seconds": -1}))
    before = tree(out)
    message = refused(load_script("bench").main, bench_argv(out), capsys)
    assert f"cost file {str(out / 'teacher_cost.json')!r} has cost field 'wall_seconds' = -1; allowed: a number >= 0" in message
    assert tree(out) == before


def test_garbage_trajectory_manifest_is_named(existing, capsys):
    (existing / "manifest.json").write_text("\x00garbage")
    before = tree(existing)
    argv = ["--teacher", "gmm:ring8", "--solver", "euler", "--nfe", "2", "--num-samples", "8", "--out", str(existing)]
    message = refused(load_script("make_trajectories").main, argv, capsys)
    assert f"trajectory cache manifest {str(existing / 'manifest.json')!r} is not valid JSON" in message
    assert tree(existing) == before


@pytest.mark.parametrize("field", ["sampling_timesteps", "training_cost"])
def test_garbage_student_metadata_field_is_named(aniso_student, tmp_path, capsys, field):
    student = with_metadata(aniso_student, tmp_path / "damaged.safetensors", **{field: "{1: [0.5"})
    argv = bench_argv(tmp_path / "o", "--students", str(student), "--student-steps", "1", teacher="gmm:aniso2d")
    message = refused(load_script("bench").main, argv, capsys)
    assert f"the {field!r} metadata field of student file {str(student)!r} is not valid JSON" in message
    assert not (tmp_path / "o").exists()



def test_bench_refuses_student_steps_the_file_does_not_record(aniso_student, tmp_path, capsys):
    argv = bench_argv(tmp_path / "o", "--students", str(aniso_student), "--student-steps", "1,8", teacher="gmm:aniso2d")
    message = refused(load_script("bench").main, argv, capsys)
    assert "samples with 1, 2, 3, 4 steps (the counts its file records), not 8; pass --student-steps with those" in message
    assert not (tmp_path / "o").exists()

# -- distill.py --set ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [("optim.lr=.nan", "optim.lr"), ("grad_clip=.nan", "grad_clip")])
def test_nan_override_names_the_key(tmp_path, capsys, override, key):
    argv = ["--config", str(RING8), "--output-dir", str(tmp_path / "run"), "--set", *TINY, override]
    message = refused(load_script("distill").main, argv, capsys)
    assert f"config key {key!r} is nan; allowed: a number >= 0" in message and "Invalid learning rate" not in message
    assert not (tmp_path / "run").exists()


# -- progressive.py: a finished chain is only reported done for the config it was trained with ------------------
PROGRESSIVE = RING8.parent / "progressive_ring8.yaml"
CHAIN = ["student.model.hidden=32", "student.model.layers=1", "objective.student_steps=4", "batch_size=32",
         "max_steps=4", "checkpoint_every=2", "log_every=2"]


@pytest.fixture(scope="module")
def finished_chain(tmp_path_factory):
    """The 4 -> 2 -> 1 rounds of progressive_ring8, 4 updates each."""
    out = tmp_path_factory.mktemp("chain") / "chain"
    assert load_script("progressive").main(["--config", str(PROGRESSIVE), "--output-dir", str(out), "--set", *CHAIN]) == 0
    return out


def _chain_copy(finished_chain, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(finished_chain, tmp_path / "chain"))


@pytest.mark.parametrize("override, key", [("optim.lr=0.01", "optim.lr"), ("max_steps=8", "max_steps"),
                                           ("teacher=gmm:aniso2d", "teacher")])
def test_progressive_rerun_with_another_config_is_refused(finished_chain, tmp_path, capsys, override, key):
    out = _chain_copy(finished_chain, tmp_path)
    before = tree(out)
    argv = ["--config", str(PROGRESSIVE), "--output-dir", str(out), "--set", *CHAIN, override]
    message = refused(load_script("progressive").main, argv, capsys)
    assert f"the config differs from the one the finished round in {str(out / 'steps-4')!r} was trained with in {key} (" in message
    assert "choose another --output-dir" in message and "Traceback" not in message
    assert tree(out) == before


def test_progressive_rerun_with_the_same_config_is_done(finished_chain, tmp_path, capsys):
    out = _chain_copy(finished_chain, tmp_path)
    argv = ["--config", str(PROGRESSIVE), "--output-dir", str(out), "--set", *CHAIN, "log_every=1"]
    assert load_script("progressive").main(argv) == 0
    assert "round 3 (1 steps): done" in capsys.readouterr().out


def test_progressive_truncated_round_student_is_refused(finished_chain, tmp_path, capsys):
    out = _chain_copy(finished_chain, tmp_path)
    student = out / "steps-2" / "student.safetensors"
    student.write_bytes(student.read_bytes()[: student.stat().st_size // 2])
    before = tree(out)
    argv = ["--config", str(PROGRESSIVE), "--output-dir", str(out), "--set", *CHAIN]
    message = refused(load_script("progressive").main, argv, capsys)
    assert f"the finished round 2's student file {str(student)!r} cannot be used (" in message
    assert "delete it to redo that round" in message and "Traceback" not in message
    assert tree(out) == before


# -- pso_online: the reward's class is one of the teacher's ------------------------------------------------------
def test_reward_class_outside_the_teachers_classes_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--config", str(RING8.parent / "pso_online_mnist16.yaml"), "--output-dir", str(out), "--set",
            "objective.reward=class_confidence", "objective.reward_class=12", "max_steps=2", "batch_size=4"]
    message = refused(load_script("distill").main, argv, capsys)
    assert "config key 'objective.reward_class' is 12; allowed: 0..9 (the 10 classes of teacher 'mnist16')" in message
    assert "Traceback" not in message and not out.exists()


# -- sample.py: a class label means nothing to a text-to-image teacher -------------------------------------------
def test_class_label_with_a_text_to_image_teacher_is_refused(tmp_path, capsys):
    from conftest import tiny_sd_pipeline

    folder = tiny_sd_pipeline(tmp_path / "sd")[0]
    out = tmp_path / "samples"
    argv = ["--teacher", str(folder), "--prompt", "a", "--class-label", "3", "--solver", "euler", "--nfe", "2", "--n", "2",
            "--out", str(out)]
    message = refused(load_script("sample").main, argv, capsys)
    assert "--class-label is for class-conditional teachers; teacher " in message and "is text-conditioned: drop --class-label" in message
    assert "Traceback" not in message and not out.exists()


def test_train_teacher_resume_refusal_names_the_config_keys(tmp_path, capsys):
    """A resume with another lr is refused naming the teacher config's key (a run config's: optim.lr), and the run
    folder is left as it was."""
    script = load_script("train_teacher").main
    out = tmp_path / "teacher"
    base = ["--config", str(RING8.parents[1] / "teachers" / "ring8_mlp.yaml"), "--output-dir", str(out), "--max-steps", "2"]
    small = ["student.model.hidden=16", "student.model.layers=1", "batch_size=16", "checkpoint_every=1", "log_every=1"]
    assert script([*base, "--set", *small]) == 0
    before = tree(out)
    message = refused(script, [*base, "--set", *small, "optim.lr=0.01"], capsys)
    assert "the config differs from the one checkpoint" in message and "in optim.lr (0.001 -> 0.01)" in message
    assert tree(out) == before
    message = refused(script, ["--config", str(RING8), "--output-dir", str(tmp_path / "cd")], capsys)
    assert "train_teacher.py trains a teacher from scratch (config key teacher: untrained)" in message
    assert "run scripts/distill.py --config" in message and not (tmp_path / "cd").exists()


# -- truncated resume states of the prepared-file commands ------------------------------------------------------
@pytest.mark.parametrize("script, what", [("compute_ems", "EMS"), ("gits_search", "GITS"), ("train_amed", "AMED")])
def test_truncated_resume_state_is_named(tmp_path, capsys, script, what):
    argv, option, _ = OUTPUTS[script]
    main, out = load_script(script).main, tmp_path / "prepared.out"
    assert main([*argv, option, str(out)]) == 0
    capsys.readouterr()
    state = Path(f"{out}.state.pt")
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    before = tree(tmp_path)
    message = refused(main, [*argv, option, str(out)], capsys)
    assert f"{what} state {str(state)!r} is truncated or damaged (not a complete torch file: " in message
    assert "Traceback" not in message and tree(tmp_path) == before


# -- a student file whose metadata was edited: bench and sample name the field -------------------------------------
def edited(student: Path, folder: Path, field: str, change) -> Path:
    """A copy of ``student`` whose JSON metadata ``field`` is ``change(old value)`` (or ``change`` itself)."""
    with safe_open(str(student), "pt") as f:
        old = json.loads(f.metadata()[field])
    return with_metadata(student, folder / "edited.safetensors", **{field: json.dumps(change(old) if callable(change) else change)})


EDITS = {
    "wider network": ("network_config", lambda c: {**c, "hidden": 32},
                      "does not match the weights the file holds (size mismatch for inp.weight"),
    "unknown argument": ("network_config", lambda c: {**c, "depth": 3}, "does not build a TimeMLP (TimeMLP.__init__() got an"),
    "data shape": ("data_shape", [3], "is [3]; allowed: a list of positive sizes; its TimeMLP network takes [2]"),
    "data rank": ("data_shape", [1, 2], "is [1, 2]; allowed: a list of positive sizes; its TimeMLP network takes [2]"),
    "time beyond t_max": ("sampling_timesteps", {"1": [5.0]},
                          "gives 1 step(s) the times [5.0], outside the schedule's [t_min, t_max] = [0.001, 1]"),
    "increasing times": ("sampling_timesteps", {"2": [0.5, 1.0]}, "gives 2 steps the times [0.5, 1.0]; allowed: decreasing"),
    "negative beta": ("schedule", lambda s: {**s, "beta_0": -0.1},
                      "is not a valid noise schedule (vp_linear schedule with beta_0 -0.1, beta_1 20.0"),
}


@pytest.mark.parametrize("cli", ["bench", "sample"])
@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_student_metadata_is_named(aniso_student, tmp_path, capsys, cli, edit):
    field, change, sentence = EDITS[edit]
    student, out = edited(aniso_student, tmp_path, field, change), tmp_path / "o"
    argv = (bench_argv(out, "--students", str(student), "--student-steps", "1", teacher="gmm:aniso2d") if cli == "bench" else
            ["--teacher", f"student:{student}", "--solver", "euler", "--nfe", "2", "--n", "4", "--out", str(out)])
    before = tree(tmp_path)
    message = refused(load_script(cli).main, argv, capsys)
    assert f"the {field!r} metadata field of student file {str(student)!r} {sentence}" in message
    assert "Traceback" not in message and tree(tmp_path) == before


# -- EMS files of dpm_solver_v3 (bench --variant ...:ems=PATH), checked before any cell -----------------------------
@pytest.fixture(scope="module")
def ems_files(tmp_path_factory):
    """EMS files of gmm:aniso2d and of gmm:ring8, tiny."""
    root = tmp_path_factory.mktemp("ems")
    for teacher in ("aniso2d", "ring8"):
        argv = ["--teacher", f"gmm:{teacher}", "--n-lams", "4", "--num-samples", "8", "--out", str(root / f"{teacher}.safetensors")]
        assert load_script("compute_ems").main(argv) == 0
    return root


@pytest.mark.parametrize("case, problem", [
    ("missing", "does not exist"),
    ("another teacher", "was made from teacher"),
    ("truncated", "is truncated or not a safetensors file ("),
])
def test_bad_ems_file_is_named_before_any_cell(ems_files, tmp_path, capsys, case, problem):
    path = {"missing": tmp_path / "none.safetensors", "another teacher": ems_files / "ring8.safetensors",
            "truncated": tmp_path / "cut.safetensors"}[case]
    if case == "truncated":
        whole = (ems_files / "aniso2d.safetensors").read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "o"
    argv = bench_argv(out, "--variant", f"v=dpm_solver_v3:ems={path}", teacher="gmm:aniso2d")
    before = tree(tmp_path)
    message = refused(load_script("bench").main, argv, capsys)
    assert f"--variant v: the ems file {str(path)!r} {problem}" in message and "Traceback" not in message
    assert tree(tmp_path) == before and not out.exists()


# -- a trajectory manifest that does not describe its shards: refused before training ----------------------------------
@pytest.fixture(scope="module")
def pairs_cache(tmp_path_factory):
    """12 trajectories of gmm:ring8 in 3 shards of 4, and a second cache of another seed (its shards: foreign ones)."""
    root = tmp_path_factory.mktemp("traj")
    for name, seed in (("pairs", "0"), ("other", "1")):
        argv = ["--teacher", "gmm:ring8", "--solver", "heun", "--nfe", "3", "--final", "clean", "--num-samples", "12",
                "--shard-size", "4", "--seed", seed, "--out", str(root / name)]
        assert load_script("make_trajectories").main(argv) == 0
    return root


def _edit_manifest(folder: Path, **changes) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**m, **changes}))


LIES = {
    "fewer samples": (lambda c: _edit_manifest(c, num_samples=10),
                      "says shard 2 holds 2 trajectories (num_samples=10, shard_size=4), but shard-00002.safetensors holds 4"),
    "fewer shards": (lambda c: _edit_manifest(c, num_samples=8, num_shards=2),
                     "counts 2 shards, but the folder also holds shard-00002.safetensors"),
    "shard size": (lambda c: _edit_manifest(c, shard_size=3),
                   "says num_samples=12, shard_size=3 and num_shards=3, which do not add up"),
    "copied shard": (lambda c: (c / "shard-00001.safetensors").write_bytes((c / "shard-00000.safetensors").read_bytes()),
                     "lists shard-00001.safetensors as shard 1, but that file is shard 0 (a copy of another shard)"),
    "foreign shard": (lambda c: (c / "shard-00001.safetensors").write_bytes((c.parent / "other" / "shard-00001.safetensors").read_bytes()),
                      "records another sha256 for shard-00001.safetensors than the file has"),
}


@pytest.mark.parametrize("lie", list(LIES))
def test_trajectory_manifest_that_lies_is_refused_before_training(pairs_cache, tmp_path, capsys, lie):
    import shutil

    damage, sentence = LIES[lie]
    cache = Path(shutil.copytree(pairs_cache / "pairs", tmp_path / "cache"))
    (tmp_path / "other").symlink_to(pairs_cache / "other")
    damage(cache)
    before, run = tree(cache), tmp_path / "run"
    argv = ["--config", str(RING8.parent / "kd_ring8.yaml"), "--output-dir", str(run), "--set", f"trajectories={cache}",
            "student.model.hidden=16", "student.model.layers=1", "batch_size=4", "max_steps=2"]
    message = refused(load_script("distill").main, argv, capsys)
    assert f"trajectory cache manifest {str(cache / 'manifest.json')!r} {sentence}" in message
    assert "make it again with scripts/make_trajectories.py" in message and "Traceback" not in message
    assert tree(cache) == before and not run.exists()


def test_trajectory_shard_hashes_are_kept_checked_and_optional(pairs_cache, tmp_path):
    """make_trajectories records every shard's sha256 and redoes a shard that differs; a manifest written before
    hashes were kept opens without the check."""
    import shutil

    from distill.engine.paths import file_sha256
    from distill.engine.trajectories import TrajectoryCache

    cache = Path(shutil.copytree(pairs_cache / "pairs", tmp_path / "cache"))
    m = json.loads((cache / "manifest.json").read_text())
    assert m["shard_sha256"] == {str(k): file_sha256(cache / f"shard-0000{k}.safetensors") for k in range(3)}
    shard = cache / "shard-00001.safetensors"
    shard.write_bytes((pairs_cache / "other" / shard.name).read_bytes())
    argv = ["--teacher", "gmm:ring8", "--solver", "heun", "--nfe", "3", "--final", "clean", "--num-samples", "12",
            "--shard-size", "4", "--out", str(cache)]
    assert load_script("make_trajectories").main(argv) == 0
    redone, made = load_file(str(shard)), load_file(str(pairs_cache / "pairs" / shard.name))
    assert all(torch.equal(redone[k], made[k]) for k in made)  # redone, as it was made
    assert json.loads((cache / "manifest.json").read_text())["shard_sha256"]["1"] == file_sha256(shard)
    shard.write_bytes((pairs_cache / "other" / shard.name).read_bytes())
    _edit_manifest(cache, shard_sha256=None)  # an old manifest: no hashes, no check
    assert TrajectoryCache(cache).num_samples == 12


# -- progressive.py: a moved chain folder resumes, as distill resumes a moved run folder -----------------------------
def test_progressive_chain_moved_mid_round_resumes_bit_identical(finished_chain, tmp_path, capsys):
    import shutil

    from distill_helpers import same_tensors

    from distill.engine.config import parse_overrides

    script = load_script("progressive")
    script.run_rounds(str(PROGRESSIVE), tmp_path / "chain", parse_overrides(CHAIN), stop_at=(2, 2), log=lambda m: None)
    moved = Path(shutil.move(tmp_path / "chain", tmp_path / "moved"))
    argv = ["--config", str(PROGRESSIVE), "--output-dir", str(moved), "--set", *CHAIN]
    assert script.main(argv) == 0
    assert all(same_tensors(finished_chain / f"steps-{n}" / "student.safetensors", moved / f"steps-{n}" / "student.safetensors")
               for n in (4, 2, 1))
    again = Path(shutil.move(moved, tmp_path / "again"))  # and a finished chain, moved, is done
    capsys.readouterr()
    assert script.main(["--config", str(PROGRESSIVE), "--output-dir", str(again), "--set", *CHAIN]) == 0
    assert "round 3 (1 steps): done" in capsys.readouterr().out


# -- damaged Stable-Diffusion-style teacher folders --------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from conftest import tiny_sd_pipeline

    return tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "sd")[0]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


SD_DAMAGE = {
    "unet": (lambda f: _truncate(f / "unet" / "diffusion_pytorch_model.safetensors"),
             "its weights file diffusion_pytorch_model.safetensors is truncated or damaged ("),
    "text_encoder": (lambda f: (f / "text_encoder" / "config.json").write_text("{oops"), "its config.json is not valid JSON ("),
    "vae": (lambda f: (f / "vae" / "diffusion_pytorch_model.safetensors").unlink(), "it has no weights file ("),
}


@pytest.mark.parametrize("part", list(SD_DAMAGE))
def test_damaged_sd_pipeline_part_is_named(sd_folder, tmp_path, capsys, part):
    import shutil

    damage, problem = SD_DAMAGE[part]
    folder = Path(shutil.copytree(sd_folder, tmp_path / "sd"))
    damage(folder)
    before, out = tree(tmp_path), tmp_path / "samples"
    argv = ["--teacher", str(folder), "--prompt", "a", "--solver", "euler", "--nfe", "2", "--n", "2", "--out", str(out)]
    message = refused(load_script("sample").main, argv, capsys)
    assert f"the {part} of pipeline folder {str(folder)!r} cannot be loaded: {problem}" in message
    assert f"restore {part}/ from the pipeline it came from" in message and "Traceback" not in message
    assert tree(tmp_path) == before


# -- DeepSpeed on a machine without a GPU runs one process ---------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_deepspeed_launch_of_several_cpu_processes_is_refused_once(tmp_path):
    import importlib.util
    import subprocess
    import sys

    import yaml
    from distill_helpers import ROOT, subprocess_env

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("the deepspeed extra is not installed")
    config = yaml.safe_load((ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml").read_text())
    (tmp_path / "accelerate.yaml").write_text(yaml.safe_dump({**config, "num_processes": 2}))  # the shipped 8, made cheaper
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "accelerate.yaml"),
           "--main_process_port", "29581", str(ROOT / "scripts" / "distill.py"), "--config", str(RING8), "--output-dir",
           str(run), "--set", *TINY]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    sentence = "error: DeepSpeed on a machine without a GPU runs one process, but the launch started 2 (WORLD_SIZE)"
    assert done.returncode != 0 and done.stderr.count(sentence) == 1, done.stderr[-3000:]
    assert "[rank0]" not in done.stderr and "[rank1]" not in done.stderr  # no rank's traceback
    assert not run.exists()


# -- init_from weights that would compute another function ------------------------------------------------------
@pytest.mark.parametrize("change, sentence", [
    ({"parameterization": "denoiser"}, "was trained with student.parameterization 'consistency_edm' and this run's is 'denoiser'"),
    ({"sigma_data": 1.0}, "was trained with student.sigma_data '0.5' and this run's is '1.0'"),
    ({"prediction_type": "epsilon"}, "was trained with student.prediction_type 'sample' and this run's is 'epsilon'"),
])
def test_init_from_another_parameterization_is_refused(aniso_student, change, sentence):
    """A consistency_edm student's weights read as a denoiser (or at another sigma_data or prediction type) are another
    function: a run that starts from them is refused, naming the key and the value to set; the same settings load."""
    teacher = load_teacher("gmm:aniso2d")
    base = {"arch": "mlp", "model": {"hidden": 16, "layers": 1}}
    with pytest.raises(ValueError, match=f"{sentence}: the same weights would compute another function; set student."):
        build_student(StudentConfig(**base, **change), teacher, init_from=aniso_student)
    same = build_student(StudentConfig(**base), teacher, init_from=aniso_student)
    assert same.parameterization == "consistency_edm"
