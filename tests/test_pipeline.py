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
