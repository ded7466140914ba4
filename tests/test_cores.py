"""distill.core.cores: DataLoader workers and torch threads sized to the cores the process may use, and torch-fidelity's
command line (distill.eval.fidelity_cli) kept to them."""

import json
import os

import pytest
import torch

from distill.core import cores


@pytest.fixture
def two_cores(monkeypatch):
    """A process allowed cores 0 and 1 of a machine that reports 8."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.delenv(cores.WORKERS_ENV, raising=False)


def test_workers_leave_the_main_process_a_core(two_cores, monkeypatch):
    assert cores.usable_cores() == 2 and cores.loader_workers() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert cores.loader_workers() == 0  # one core: load in the main process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert cores.loader_workers() == 4 and cores.loader_workers(cap=8) == 8
    monkeypatch.delattr(os, "sched_getaffinity")  # no affinity call on this platform: the machine's count
    assert cores.usable_cores() == 8
    monkeypatch.setenv(cores.WORKERS_ENV, "0")
    assert cores.loader_workers() == 0
    monkeypatch.setenv(cores.WORKERS_ENV, "two")
    with pytest.raises(ValueError, match=r"DISTILL_NUM_WORKERS='two' is not a worker count; allowed: a non-negative integer"):
        cores.loader_workers()


def test_fidelity_cli_gives_its_loaders_the_usable_cores(two_cores, monkeypatch, tmp_path, capsys):
    """torch-fidelity asks for min(4, 2 x cpu_count()) = 4 workers on this 8-core machine; 2 usable cores allow 1."""
    import multiprocessing

    import torch_fidelity.utils as fidelity_utils
    from torch.utils.data import DataLoader

    from distill.eval.bench import save_png_folder
    from distill.eval.fidelity_cli import main as fidelity

    monkeypatch.setattr(multiprocessing, "cpu_count", lambda: 8)
    asked = []

    def recording_loader(*args, num_workers=0, **kwargs):
        asked.append(num_workers)
        return DataLoader(*args, num_workers=0, **kwargs)  # no processes in the test itself

    monkeypatch.setattr(fidelity_utils, "DataLoader", recording_loader)
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        save_png_folder(torch.rand(24, 1, 16, 16, generator=g) * 2 - 1, tmp_path / name)
    capsys.readouterr()
    fidelity(["--input1", str(tmp_path / "a"), "--input2", str(tmp_path / "b"), "--fid", "--feature-extractor",
              "mnist16-classifier", "--cpu", "--json", "--silent", "--no-cache"])
    assert json.loads(capsys.readouterr().out)["frechet_inception_distance"] >= 0
    assert asked == [1, 1]  # both folders' loaders
    assert fidelity_utils.DataLoader is recording_loader  # put back after the command


def test_thread_plan_follows_cores_processes_and_overrides(two_cores, monkeypatch):
    """The usable cores but one, shared by this machine's processes, unless OMP_NUM_THREADS or an explicit count
    (config, --threads) says."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cores.thread_plan()["threads"] == cores.thread_plan()["interop_threads"] == 1  # 2 cores: one stays free
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # accelerate launch --num_processes 2 on this machine
    assert cores.thread_plan()["threads"] == 1 and cores.loader_workers() == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert cores.thread_plan()["threads"] == 7 and cores.loader_workers() == 4  # (16 - 1) // 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert cores.thread_plan()["threads"] == 15 and "one kept free" in cores.thread_plan()["source"]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cores.thread_plan()["threads"] == 3 and cores.thread_plan()["source"] == "OMP_NUM_THREADS"
    assert cores.thread_plan(threads=5, interop_threads=1) == {"threads": 5, "interop_threads": 1, "source": "config or --threads"}
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=r"threads=.* is not a thread count; allowed: a positive integer"):
            cores.thread_plan(threads=bad)


def _child_threads(env: dict, affinity: set[int] | None = None) -> dict:
    """What a fresh process reports after configure_threads: its plan and torch's counts."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import json, torch; from distill.core.cores import configure_threads; p = configure_threads(); "
            "print(json.dumps({**p, 'torch': torch.get_num_threads(), 'interop': torch.get_num_interop_threads()}))")
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", cores.DEFAULTS_ENV)}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1], preexec_fn=(lambda: os.sched_setaffinity(0, affinity)) if affinity else None)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_a_fresh_process_sizes_torch_to_its_allowed_cores():
    every = sorted(os.sched_getaffinity(0))
    one = _child_threads({}, affinity={every[0]})  # taskset -c 0
    assert (one["torch"], one["interop"]) == (1, 1)
    alone = _child_threads({})
    assert alone["torch"] == max(1, len(every) - 1)
    shared = _child_threads({"LOCAL_WORLD_SIZE": str(len(every))})  # as many launched processes as cores: one thread each
    assert shared["torch"] == 1
    chosen = _child_threads({"OMP_NUM_THREADS": "2"})
    assert chosen["torch"] == 2 and chosen["source"] == "OMP_NUM_THREADS"  # the environment's choice stays
    off = _child_threads({cores.DEFAULTS_ENV: "off"})
    assert off["source"].startswith("torch's defaults")


def test_distill_and_bench_refuse_a_thread_count_that_is_not_one(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).parents[1]

    def script(name):
        spec = importlib.util.spec_from_file_location(f"_cores_{name}", root / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    assert script("distill").main(["--config", str(root / "configs/distill/cd_ring8.yaml"), "--threads", "0",
                                   "--output-dir", str(tmp_path / "run")]) == 1
    assert "config key 'threads' must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        script("bench").main(["--teacher", "gmm:ring8", "--solvers", "ddim", "--nfe", "2", "--threads", "-1",
                              "--out", str(tmp_path / "bench")])
    assert "threads=-1 is not a thread count; allowed: a positive integer" in str(refused.value.code)
    assert not (tmp_path / "run").exists() and not (tmp_path / "bench").exists()
