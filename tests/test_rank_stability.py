"""Rank stability (distill/eval/rank_stability.py, scripts/rank_stability.py)."""

import importlib.util
from pathlib import Path

import pytest

from distill.eval.rank_stability import stability


def test_stability_counts_held_orders_and_kept_pairs():
    sets = [{"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}, {"a": 1.1, "b": 2.2, "c": 3.5, "d": 3.4},
            {"a": 2.1, "b": 2.0, "c": 3.0, "d": 5.0}]
    out = stability(sets, k=3)
    assert out["top"] == [["a", "b", "c"], ["a", "b", "d"], ["b", "a", "c"]]
    assert out["modal_top"] == ["a", "b", "c"] and out["top_k_held"] == pytest.approx(1 / 3)
    assert out["pairs_kept"] == pytest.approx(4 / 6)  # a-b and c-d flip once; a-c, a-d, b-c, b-d never
    assert stability(sets[:1] * 2, k=2)["top_k_held"] == 1.0
    with pytest.raises(ValueError, match="at least 2 seed sets"):
        stability(sets[:1])
    with pytest.raises(ValueError, match="same entries"):
        stability([sets[0], {"a": 1.0}])


def test_script_runs_and_refuses_overlapping_seeds(tmp_path):
    spec = importlib.util.spec_from_file_location("rank_script", Path(__file__).parents[1] / "scripts" / "rank_stability.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    entries = ["--entry", "solver:euler@1", "--entry", "solver:euler@4", "--entry", "solver:unipc@8"]
    with pytest.raises(SystemExit, match="overlap"):
        script.main(["--teacher", "mnist16", *entries, "--num-samples", "64", "--seeds", "0,32", "--out", str(tmp_path / "x")])
    assert script.main(["--teacher", "mnist16", *entries, "--num-samples", "64", "--seeds", "0,64", "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "stability.md").read_text()
    assert "euler (1 NFE)" not in text.split("| 0.. |")[1].split("|")[1].split(",")[0]  # one Euler step never leads


def test_feature_bench_accepts_a_chained_student_by_its_folder():
    """A progressive round's student names its parent round as teacher; the bench finds the chain's root in the
    student's folder (check_student's near), so the commands built on feature_bench accept it as the bench does."""
    from distill.eval.paired import feature_bench
    from students import load_student
    from teachers import load_teacher

    path = Path(__file__).parents[1] / "results/mnist16/students/progressive_mnist16_8.safetensors"
    entries, cfg, metric = feature_bench(load_teacher("mnist16"), [f"student:{path}@8"], 16, 0, 16, load_student)
    assert entries[0].n == 8 and entries[0].path == str(path) and cfg.num_samples == 16 and hasattr(metric, "ref_features")
