"""scripts/gpu_check.py end to end at its tiny size: the same code path a GPU runs (training workers, the DeepSpeed
decision, solvers against diffusers), its JSON and markdown results."""

import json
import math
import subprocess
import sys
from importlib.util import find_spec

import torch
from distill_helpers import ROOT, subprocess_env


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_gpu_check_tiny_run_writes_json_and_markdown(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--tiny", "--steps", "3", "--out", str(out)]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    gpu = torch.cuda.is_available()
    [path] = out.glob("*.json")
    assert path.stem == ("cpu" if not gpu else f"{path.stem.removesuffix('-tiny')}-tiny")
    r = json.loads(path.read_text())
    assert r["command"] == "python scripts/gpu_check.py --tiny --steps 3 --out " + str(out)
    assert r["versions"]["torch"] == torch.__version__ and r["versions"]["diffusers"]
    assert r["device"]["kind"] == ("cuda" if gpu else "cpu") and r["device"]["mixed_precision"] == ("bf16" if gpu else "no")
    assert r["model"]["class"] == "UNet2DModel" and r["model"]["sample_size"] == 8 and r["model"]["parameters"] > 0
    for name, objective in (("consistency", "consistency"), ("sid", "sid")):
        row = r["training"][name]
        assert row["objective"] == objective and row["steps"] == 3 and row["timed_steps"] == 1  # 2 warm-up steps left out
        assert all(_positive(row[k]) for k in ("steps_per_second", "images_per_second", "peak_memory_bytes")), row
    assert r["training"]["consistency"]["parameterization"] == "consistency_edm"
    deepspeed = r["training"]["deepspeed_zero2"]
    if gpu and find_spec("deepspeed") is not None:
        assert _positive(deepspeed["steps_per_second"]), deepspeed
    else:
        assert deepspeed["skipped"] and "failed" not in deepspeed
    assert set(r["sampling"]["solvers"]) == {"dpmpp_2m", "unipc"}
    for row in r["sampling"]["solvers"].values():
        assert row["nfe"] == 10 and _positive(row["ours_images_per_second"]) and _positive(row["diffusers_images_per_second"])
        assert row["max_abs_difference"] < 1e-2  # same UNet, noise and timesteps: the same samples
    table = path.with_suffix(".md").read_text()
    assert r["command"] in table and "| consistency | 8 |" in table and "| dpmpp_2m |" in table
    assert ("skipped: " in table) == ("skipped" in deepspeed)
