"""The engine benchmarks (``scripts/engine_*.py`` are their front ends; results/engine/): ``threads``, ``overhead``,
``startup``, ``compile`` and ``memory``, and what they share here: the machine's description, a competing CPU load of
known size, a training run's per-step times read from its ``metrics.jsonl``, and the teacher loader and student builder
the front end passes in (``set_loaders``: distill imports neither package).

Timings mean something only on a machine nothing else uses; ``machine()`` records the load average at the start so a
reader can see whether it was.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DISTILL = ROOT / "scripts" / "distill.py"

# a busy process: `threads` torch threads multiplying 512 x 512 matrices without pause
LOAD_CODE = ("import sys, torch\ntorch.set_num_threads(int(sys.argv[1]))\na = torch.randn(512, 512)\n"
             "while True:\n    a = torch.tanh(a @ a * 1e-3)\n")


_LOADERS: dict = {}


def set_loaders(load_teacher, build_student) -> None:
    """``teachers.load_teacher`` and ``students.build_student``, given by the script (distill imports neither)."""
    _LOADERS.update(load_teacher=load_teacher, build_student=build_student)


def load_teacher(spec):
    return _LOADERS["load_teacher"](spec)


def build_student(*args, **kwargs):
    return _LOADERS["build_student"](*args, **kwargs)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The hardware and software a timing was made on, and the load average when it started."""
    import torch

    from distill.core.cores import usable_cores

    return {"cpu": cpu_model(), "usable_cores": usable_cores(), "machine_cores": os.cpu_count(),
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def machine_line(m: dict) -> str:
    load = m.get("load_average_at_start")
    return (f"{m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']}, Python {m['python']}, {m['date']}"
            + (f" (load average at start {load[0]:.2f})" if load else ""))


@contextlib.contextmanager
def competing_load(threads: int):
    """A background process of ``threads`` busy torch threads while the block runs (none for 0), stopped after it."""
    if threads <= 0:
        yield None
        return
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    proc = subprocess.Popen([sys.executable, "-c", LOAD_CODE, str(threads)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(2.0)  # torch imported and the loop running before anything is timed
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def train_steps(config: str | Path, out: Path, steps: int, overrides: list[str] = (), env: dict | None = None,
                timeout: float = 600.0, extra_args: list[str] = ()) -> dict:
    """Run ``scripts/distill.py`` for ``steps`` steps with one metrics row per step and no checkpoint before the last;
    return its per-step seconds (``seconds_per_step`` of each row), the wall time and whether it ended in time (a run
    past ``timeout`` is stopped and its rows so far are kept)."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(DISTILL), "--config", str(config), "--output-dir", str(out), "--max-steps", str(steps),
           *extra_args, "--set", "log_every=1", f"checkpoint_every={steps}", *overrides]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        finished, log = proc.returncode == 0, proc.stdout + proc.stderr
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log[-3000:]}")
    except subprocess.TimeoutExpired as e:
        finished, log = False, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    wall = time.perf_counter() - t0
    metrics = out / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    seconds = [r["seconds_per_step"] for r in rows if r.get("network", "student") == rows[0].get("network", "student")] if rows else []
    return {"seconds": seconds, "wall": wall, "finished": finished, "log": log}


def median_after(values: list[float], skip: int) -> float | None:
    """The median of ``values`` after the first ``skip`` (warm-up), or of all when there are no more."""
    kept = values[skip:] or values
    return statistics.median(kept) if kept else None


def start(out: Path, script: str, argv) -> str | None:
    """The benchmark's command line (``python scripts/<script> ...``), or None after printing why ``out`` cannot be
    written (the front end then exits 1)."""
    import shlex

    from distill.engine.paths import check_output_dir

    try:
        check_output_dir(out, "--out")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    return f"python scripts/{script} " + shlex.join(argv if argv is not None else sys.argv[1:])


def write_results(out: Path, stem: str, result: dict, markdown: str) -> None:
    """``<out>/<stem>.json`` and ``<stem>.md``, each written whole or not at all."""
    from distill.core.atomic import write_text

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    write_text(out / f"{stem}.md", markdown)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")

