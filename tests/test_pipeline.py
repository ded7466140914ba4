"""The whole path a user takes: distill -> export -> bench the student against the solvers on one plot."""

import csv

from conftest import load_script
from distill_helpers import run, tiny_cfg


def test_distill_export_and_bench_a_student_on_the_analytic_ring(tmp_path):
    run(tiny_cfg(tmp_path / "run", "max_steps=20", "checkpoint_every=20"))
    load_script("export").main([str(tmp_path / "run"), "--out", str(tmp_path / "cd.safetensors")])
    load_script("bench").main(["--teacher", "gmm:ring8", "--unconditional", "--solvers", "euler", "--nfe", "1,2",
                           "--students", str(tmp_path / "cd.safetensors"), "--student-steps", "1,2",
                           "--num-samples", "64", "--reference-steps", "40", "--out", str(tmp_path / "bench")])
    rows = list(csv.DictReader(open(tmp_path / "bench" / "fid_vs_nfe.csv")))
    cells = {(r["kind"], r["method"], r["nfe"]) for r in rows}
    assert {("solver", "euler", "1"), ("solver", "euler", "2"), ("student", "cd", "1"), ("student", "cd", "2")} <= cells
    assert all(float(r["swd"]) > 0 for r in rows if r["kind"] != "floor")
    assert (tmp_path / "bench" / "fid_vs_nfe.png").stat().st_size > 10_000


def test_the_demo_runs_every_stage_on_the_mnist16_teacher_and_resumes(tmp_path, capsys):
    """The README's main job (scripts/demo.py), shrunk: 2 distillation steps, 16 samples per cell."""
    demo = load_script("demo").main
    args = ["--out", str(tmp_path / "demo"), "--max-steps", "2", "--num-samples", "40", "--tune-samples", "16",
            "--solvers", "euler", "--nfe", "1,2", "--teacher-nfe", "3"]
    assert demo(args) == 0
    rows = list(csv.DictReader(open(tmp_path / "demo" / "bench" / "fid_vs_nfe.csv")))
    cells = {(r["kind"], r["method"], r["nfe"]) for r in rows}
    assert {("solver", "euler", "1"), ("solver", "euler", "2"), ("solver", "unipc", "3"), ("student", "student", "1"),
            ("student", "student", "2")} <= cells
    assert all(float(r["fid"]) > 0 for r in rows)
    from distill.eval.select import read_selection  # the choice between raw and EMA weights is recorded in the file

    record = read_selection(tmp_path / "demo" / "student.safetensors") or read_selection(tmp_path / "demo" / "student_untuned.safetensors")
    assert record["split"] == "tune" and len(record["candidates"]) == 2
    paired = (tmp_path / "demo" / "paired" / "paired.md").read_text()
    assert "## The few-step goal" in paired and "student `student`, 2 steps | student `student`, 1 step |" in paired
    capsys.readouterr()
    assert demo(args) == 0  # a finished demo skips its training, export, selection and search
    out = capsys.readouterr().out
    assert "1/5" not in out and "2/5" not in out and "3/5" not in out and "4/5 FID vs NFE" in out
    assert demo(["--max-steps", "0"]) == 2
