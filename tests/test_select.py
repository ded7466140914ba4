"""scripts/select_student.py: a choice among candidate student files made on the tune split and tune seeds, recorded in the
chosen file's metadata; reporting seeds refused."""

import importlib.util
from pathlib import Path

import pytest
from safetensors import safe_open

from students import load_student

ROOT = Path(__file__).parents[1]
A = ROOT / "results/mnist16/students/progressive_mnist16_1.safetensors"
B = ROOT / "results/mnist16/students/sid_from_pd1_mnist16.safetensors"


def _script():
    spec = importlib.util.spec_from_file_location("select_script", ROOT / "scripts" / "select_student.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_select_chooses_the_lowest_tune_fid_and_records_it(tmp_path):
    out = tmp_path / "chosen.safetensors"
    assert _script().main(["--candidates", str(A), str(B), "--num-samples", "300", "--out", str(out)]) == 0
    record = load_student(str(out)).info["selection"]
    fids = record["candidates"]
    assert set(fids) == {str(A), str(B)} and record["chosen"] == min(fids, key=fids.get)
    assert record["split"] == "tune" and record["seeds"] == [900_000, 900_299] and record["steps"] == 1
    chosen, copy = _tensors(record["chosen"]), _tensors(out)
    assert chosen.keys() == copy.keys() and all((chosen[k] == copy[k]).all() for k in chosen)


def test_reporting_seeds_are_refused(tmp_path):
    out = tmp_path / "chosen.safetensors"
    with pytest.raises(SystemExit, match=r"--seed 5 may overlap the reporting seeds 0..99999; allowed: a tune seed of at least 100000"):
        _script().main(["--candidates", str(A), str(B), "--seed", "5", "--out", str(out)])
    assert not out.exists()


def test_one_candidate_is_recorded_in_place_with_its_history(tmp_path):
    """A single candidate is a record, not a choice: rule 'one candidate', its tune FID, the history as given; recorded in
    place, beside the file, which stays byte-identical (students distilled from it name its content hash)."""
    import shutil

    path = tmp_path / "s.safetensors"
    shutil.copy(ROOT / "results/mnist16/students/cd_edm_mnist16.safetensors", path)  # distilled from mnist16 itself
    raw = path.read_bytes()
    assert _script().main(["--candidates", str(path), "--num-samples", "100", "--history", "EMA chosen on the reference split",
                           "--out", str(path)]) == 0
    from distill.eval.select import read_selection

    record = read_selection(path)
    assert record["rule"].startswith("one candidate") and record["history"] == "EMA chosen on the reference split"
    assert list(record["candidates"]) == [str(path)] and record["chosen"] == str(path)
    assert path.read_bytes() == raw and (tmp_path / "s.selection.json").is_file()  # the file itself is unchanged


def test_every_committed_student_has_its_selection_recorded_on_tune_data():
    """Issue #31 item 8: each committed student names what was chosen and on which data (its metadata or the record
    beside it), and every record's FIDs are on the tune split and tune seeds."""
    from distill.eval.select import REPORTING_SEEDS, read_selection

    files = sorted((ROOT / "results/mnist16/students").glob("*.safetensors"))
    assert len(files) >= 20
    for f in files:
        record = read_selection(f)
        assert record is not None, f"{f.name} has no selection record"
        assert record["split"] == "tune" and min(record["seeds"]) >= REPORTING_SEEDS, f.name


def test_selection_curve_plots_the_recorded_tune_fids_per_checkpoint(tmp_path):
    """scripts/selection_curve.py reads the candidates' tune FIDs back from the record: one curve per weight kind, steps
    from the export names, the chosen one named; a file without such a record is refused."""
    from distill.eval.select import write_record_beside

    spec = importlib.util.spec_from_file_location("selection_curve", ROOT / "scripts" / "selection_curve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    student = tmp_path / "s.safetensors"
    student.write_bytes(A.read_bytes())
    fids = {"x/s_raw_500.safetensors": 30.0, "x/s_ema_500.safetensors": 28.0, "x/s_raw_250.safetensors": 35.5,
            "x/s_ema_250.safetensors": 33.0, "x/other.safetensors": 1.0}
    write_record_beside(student, {"candidates": fids, "chosen": "x/s_ema_500.safetensors", "split": "tune", "steps": 2,
                                  "seeds": [900000, 900999]})
    assert mod.curve_points({"candidates": fids}) == {"ema": [(250, 33.0), (500, 28.0)], "raw": [(250, 35.5), (500, 30.0)]}
    assert mod.main([str(student), "--out", str(tmp_path / "curve")]) == 0
    table = (tmp_path / "curve.md").read_text()
    assert "| 250 | 33.00 | 35.50 |" in table and "Chosen: `x/s_ema_500.safetensors`" in table
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert mod.main([str(A), "--out", str(tmp_path / "none")]) == 1
