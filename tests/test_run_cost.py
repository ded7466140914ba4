"""scripts/run_cost.py: a student's cost sidecar from its run folders, summed over a lineage, read back by the bench."""

import json

import pytest
import torch
from conftest import load_script
from safetensors.torch import save_file

run_cost = load_script("run_cost")


def fake_run(folder, rows, batch_size=64, params=((3, 4), (5,))):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"batch_size: {batch_size}\nseed: 0\n")
    lines = [json.dumps({"step": s, "network": net, "loss": 1.0, "seconds_per_step": sps}) for s, net, sps in rows]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    save_file({f"w{i}": torch.zeros(shape) for i, shape in enumerate(params)}, str(folder / "student.safetensors"))
    return folder


def test_cost_sums_a_lineage_and_counts_teacher_evaluations(tmp_path):
    # round 1: steps 0-50 at 0.2 s, 50-100 at 0.4 s (a fake-score row is not the student's); round 2: 30 steps at 1 s,
    # with step 20 logged twice and counted once, and a last line cut short by a kill skipped
    a = fake_run(tmp_path / "a", [(50, "student", 0.2), (50, "fake_score", 9.0), (100, "student", 0.4)])
    b = fake_run(tmp_path / "b", [(20, "student", 1.0), (20, "student", 1.0), (30, "student", 1.0)])
    with open(b / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "network": "stud')
    out = tmp_path / "s.cost.json"
    assert run_cost.main([str(a), str(b), "--hardware", "cpu", "--teacher-nfe-per-step", "128",
                          "--extra-teacher-nfe", "7", "--extra-seconds", "4", "--out", str(out)]) == 0
    cost = json.loads(out.read_text())
    assert cost == {"steps": 130, "batch_size": 64, "wall_seconds": round(50 * 0.2 + 50 * 0.4 + 30 * 1.0 + 4),
                    "hardware": "cpu", "teacher_nfe": 128 * 130 + 7, "trained_params": 12 + 5}
    bench = load_script("bench")  # the bench reads the sidecar beside the student file as it is
    student = tmp_path / "s.safetensors"
    save_file({"w": torch.zeros(2)}, str(student))
    assert bench.student_cost(str(student), None) == cost


def test_bad_runs_are_refused_with_a_sentence(tmp_path, capsys):
    a = fake_run(tmp_path / "a", [(10, "student", 0.1)], batch_size=64)
    b = fake_run(tmp_path / "b", [(10, "student", 0.1)], batch_size=32)
    out = tmp_path / "c.json"
    assert run_cost.main([str(a), str(b), "--hardware", "cpu", "--teacher-nfe-per-step", "0", "--out", str(out)]) == 2
    assert "batch sizes differ" in capsys.readouterr().err and not out.exists()
    assert run_cost.main([str(tmp_path / "nope"), "--hardware", "cpu", "--teacher-nfe-per-step", "0",
                          "--out", str(out)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ValueError, match=">= 0"):
        run_cost.run_cost([a], "cpu", -1)


def test_a_checkpoint_export_counts_only_its_steps_and_the_last_objective_its_own_rate(tmp_path):
    # a progressive round (128 teacher evaluations a step) then a dmd2 fine-tune (64 / 5 a step) exported at step 40
    a = fake_run(tmp_path / "a", [(100, "student", 0.5)])
    b = fake_run(tmp_path / "b", [(25, "student", 1.0), (50, "student", 2.0)])
    cost = run_cost.run_cost([a, b], "cpu", 128, up_to=40, teacher_nfe_per_step_last=64 / 5)
    assert cost["steps"] == 140 and cost["wall_seconds"] == round(50 + 25 * 1.0 + 15 * 2.0)
    assert cost["teacher_nfe"] == 128 * 100 + round(64 / 5 * 40)
    with pytest.raises(ValueError, match="fewer than the 60 asked for"):
        run_cost.run_cost([a, b], "cpu", 128, up_to=60)


def test_a_lineage_of_three_objectives_counts_each_run_at_its_own_rate(tmp_path):
    # progressive (128 a step), then SiD (64), then Uni-Instruct (64) from the SiD student: one rate per folder
    a = fake_run(tmp_path / "a", [(100, "student", 0.5)])
    b = fake_run(tmp_path / "b", [(30, "student", 1.0)])
    c = fake_run(tmp_path / "c", [(20, "student", 2.0)])
    cost = run_cost.run_cost([a, b, c], "cpu", 128, teacher_nfe_per_run=[128, 64, 64])
    assert cost["steps"] == 150 and cost["teacher_nfe"] == 128 * 100 + 64 * 30 + 64 * 20
    out = tmp_path / "cost.json"
    assert run_cost.main([str(a), str(b), str(c), "--hardware", "cpu", "--teacher-nfe-per-run", "128,64,64",
                          "--out", str(out)]) == 0  # the per-run rates alone are enough
    assert json.loads(out.read_text())["teacher_nfe"] == cost["teacher_nfe"]
    out.unlink()
    for bad in (["--teacher-nfe-per-run", "128,x,64"], []):  # an unparsable rate, or no rate at all: refused, nothing written
        assert run_cost.main([str(a), str(b), str(c), "--hardware", "cpu", *bad, "--out", str(out)]) == 2
        assert not out.exists()
    with pytest.raises(ValueError, match="drop --teacher-nfe-per-step-last"):  # two rates for the last run: refused
        run_cost.run_cost([a, b, c], "cpu", None, teacher_nfe_per_step_last=12.8, teacher_nfe_per_run=[128, 64, 64])
    with pytest.raises(ValueError, match="has 2 values for 3 run folders"):
        run_cost.run_cost([a, b, c], "cpu", 128, teacher_nfe_per_run=[128, 64])


def test_a_parent_cost_file_adds_the_lineage_whose_runs_are_gone(tmp_path, capsys):
    b = fake_run(tmp_path / "b", [(30, "student", 1.0)])
    parent = tmp_path / "p.cost.json"
    parent.write_text(json.dumps({"steps": 6000, "batch_size": 64, "wall_seconds": 3039, "hardware": "cpu", "teacher_nfe": 768000,
                                  "trained_params": 17}))
    out = tmp_path / "s.cost.json"
    assert run_cost.main([str(b), "--hardware", "cpu", "--teacher-nfe-per-step", "128", "--parent-cost", str(parent),
                          "--out", str(out)]) == 0
    cost = json.loads(out.read_text())
    assert (cost["steps"], cost["wall_seconds"], cost["teacher_nfe"]) == (6030, 3069, 768000 + 128 * 30)
    parent.write_text(json.dumps({"steps": 1, "batch_size": 32, "wall_seconds": 1, "teacher_nfe": 1}))
    assert run_cost.main([str(b), "--hardware", "cpu", "--teacher-nfe-per-step", "1", "--parent-cost", str(parent),
                          "--out", str(tmp_path / "t.json")]) == 2
    assert "batch size 32, the runs 64" in capsys.readouterr().err and not (tmp_path / "t.json").exists()
