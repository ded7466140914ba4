"""Distance to the teacher (distill/eval/teacher_ref.py, scripts/teacher_fd.py): the cache of teacher reference
features (keyed by what made them, reused, regenerated when damaged), the teacher against itself on disjoint seeds
within the floor while a coarse sampler is far outside it, disjoint seed ranges, the command line."""

import csv

import pytest
import torch

from distill.eval import bench as lib
from distill.eval.teacher_ref import check_disjoint, reference_key, teacher_features, teacher_referenced
from teachers import load_teacher

N = 160


@pytest.fixture(scope="module")
def setup():
    teacher = load_teacher("mnist16")
    cfg = lib.BenchConfig(num_samples=N, seed=0, batch_size=N)
    cfg.validate(teacher)
    return teacher, cfg, lib.make_metric(teacher, cfg)


def test_reference_features_are_cached_by_what_made_them(setup, tmp_path, monkeypatch):
    teacher, cfg, metric = setup
    first = teacher_features(teacher, cfg, metric, "unipc", 4, 10_000, N, tmp_path)
    files = list(tmp_path.glob("teacher-*.safetensors"))
    assert len(files) == 1 and first.shape[0] == N
    import distill.eval.teacher_ref as ref_mod

    monkeypatch.setattr(ref_mod, "generate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("regenerated")))
    assert torch.equal(teacher_features(teacher, cfg, metric, "unipc", 4, 10_000, N, tmp_path), first)  # from the cache
    keys = {reference_key(teacher, cfg, metric, s, n, seed, N) for s, n, seed in
            [("unipc", 4, 10_000), ("unipc", 8, 10_000), ("euler", 4, 10_000), ("unipc", 4, 20_000)]}
    assert len(keys) == 4
    monkeypatch.undo()
    files[0].write_bytes(b"damaged")
    notes = []
    again = teacher_features(teacher, cfg, metric, "unipc", 4, 10_000, N, tmp_path, log=notes.append)
    assert torch.equal(again, first) and "unreadable" in notes[0]


def test_teacher_against_itself_is_within_the_floor(setup, tmp_path):
    """The same sampler on a third seed range scores like the floor (within 3 spreads); one Euler step does not."""
    teacher, cfg, metric = setup
    ref = teacher_features(teacher, cfg, metric, "unipc", 8, 10_000, N, tmp_path)
    floor = teacher_referenced(teacher_features(teacher, cfg, metric, "unipc", 8, 20_000, N, tmp_path), ref)
    same = teacher_referenced(teacher_features(teacher, cfg, metric, "unipc", 8, 30_000, N, tmp_path), ref)
    coarse = teacher_referenced(teacher_features(teacher, cfg, metric, "euler", 1, 30_000, N, tmp_path), ref)
    spread = max(floor["fd_teacher_std"], same["fd_teacher_std"])
    assert abs(same["fd_teacher"] - floor["fd_teacher"]) < 3 * spread, (same, floor)
    assert coarse["fd_teacher"] > floor["fd_teacher"] + 10 * spread, (coarse, floor)


def test_overlapping_seed_ranges_are_refused():
    check_disjoint(100, {"entry": 0, "reference": 100, "floor": 200})
    with pytest.raises(ValueError, match=r"the entry seeds 0..99 overlap the reference seeds from 50; allowed: seed starts "
                                         r"at least --num-samples \(100\) apart"):
        check_disjoint(100, {"entry": 0, "reference": 50, "floor": 200})


def test_command_line_appends_rows(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("teacher_fd", Path(__file__).parents[1] / "scripts" / "teacher_fd.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--teacher", "mnist16", "--solver", "unipc", "--nfe", "4", "--num-samples", "64", "--entry", "solver:euler@2",
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "fd.csv")]
    assert script.main(args) == 0
    rows = list(csv.DictReader(open(tmp_path / "fd.csv")))
    assert [r["entry"] for r in rows] == ["teacher floor (disjoint seeds)", "euler (2 NFE)"]
    assert all(float(r["fd_teacher"]) > 0 and 0 <= float(r["recall_teacher"]) <= 1 for r in rows)  # N = 64: bias-dominated
    with pytest.raises(SystemExit, match="overlap"):
        script.main([*args[:-2], "--ref-seed", "10", "--out", str(tmp_path / "fd2.csv")])
    assert not (tmp_path / "fd2.csv").exists()
