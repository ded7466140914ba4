"""The engine benchmarks (scripts/engine_*.py) run end to end at tiny size: their numbers are made on an idle machine
by hand (results/engine/), but the code that makes them is checked here, on the ring8 config (no timing asserted)."""

import importlib.util
import json
from pathlib import Path

from distill.eval.engine_bench.startup import PHASES

ROOT = Path(__file__).parents[1]
RING8 = "configs/distill/cd_ring8.yaml"


def script(name):
    spec = importlib.util.spec_from_file_location(f"_engine_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_engine_overhead_times_both_loops_phase_by_phase(tmp_path):
    assert script("engine_overhead").main(["--configs", RING8, "configs/distill/sid_ring8.yaml", "--steps", "2",
                                           "--rounds", "2", "--batch-size", "16", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "overhead.json").read_text())
    cd, sid = result["configs"]
    assert sid["networks"] == ["student", "fake_score"] and len(cd["trainer_rounds"]) == 2
    for c in (cd, sid):
        assert c["trainer_seconds_per_step"] > 0 and c["minimal_seconds_per_step"] > 0 and c["checkpoint_seconds"] > 0
        for phases in (c["trainer_phases_per_step"], c["minimal_phases_per_step"]):
            assert phases["forward_backward"] > 0 and phases["optimizer"] > 0 and phases["teacher"] >= 0
    assert "| config | networks | batch |" in (tmp_path / "overhead.md").read_text()


def test_engine_startup_reports_every_phase_cold_and_warm(tmp_path):
    assert script("engine_startup").main(["--configs", RING8, "--repeats", "2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "startup.json").read_text())["rows"]
    assert [r["cache"] for r in rows] == ["cold", "warm"]
    for r in rows:
        assert set(r["phases"]) == set(PHASES) and r["phases"]["imports"] > 0
        assert abs(sum(r["phases"].values()) - r["total"]) < 1e-6


def test_engine_threads_measures_each_setting(tmp_path):
    assert script("engine_threads").main(["--config", RING8, "--steps", "3", "--loads", "0", "--settings", "new", "old",
                                          "--bench-samples", "0", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "threads.json").read_text())["rows"]
    assert [(r["load_threads"], r["setting"]) for r in rows] == [(0, "new"), (0, "old")]
    assert all(r["step_seconds"] > 0 and r["steps_logged"] == 3 for r in rows)
    assert "| load (busy threads) | setting |" in (tmp_path / "threads.md").read_text()


def test_every_engine_benchmark_refuses_an_output_that_is_a_file_before_any_work(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("kept\n")
    for name in ("engine_overhead", "engine_startup", "engine_threads"):
        assert script(name).main(["--out", str(target)]) == 1
        assert f"--out '{target}' is a file, but a folder is expected there" in capsys.readouterr().err
    assert target.read_text() == "kept\n"
