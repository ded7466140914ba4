#!/usr/bin/env python3
"""Create (or reuse) the project's virtual environment in .venv, then run a job.

    python3 scripts/dev.py demo      # the main job on the embedded default (no GPU, no download)
    python3 scripts/dev.py test      # the test suite, one pytest-xdist worker per core (extra arguments go to pytest)

Needs only python3. The environment is reinstalled when pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"


def ensure_env() -> Path:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    stamp = VENV / f".installed-{digest}"
    if not PY.exists():
        print(f"creating virtual environment {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    if not stamp.exists():
        print("installing the project and its dependencies (first run: a few minutes)", flush=True)
        subprocess.check_call([str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-e", ".[dev]"], cwd=ROOT)
        # the deepspeed extra builds against the installed torch, so it goes in without build isolation
        subprocess.check_call([str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-build-isolation",
                               "-e", ".[deepspeed]"], cwd=ROOT)
        for old in VENV.glob(".installed-*"):
            old.unlink()
        stamp.write_text("ok\n")
    return PY


def xdist_workers(args: list[str]) -> list[str]:
    """pytest-xdist workers, one per usable core (at most 4; the tests run one torch thread each), unless the
    arguments choose (-n / -p no:xdist); one core: no workers. A test file stays on one worker (its module fixtures are
    built once)."""
    if any(a.startswith(("-n", "--numprocesses")) or a == "no:xdist" for a in args):
        return []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return ["-n", str(min(cores, 4)), "--dist", "loadfile"] if cores > 1 else []


def main(argv: list[str]) -> int:
    jobs = {
        "demo": [ROOT / "scripts" / "demo.py"],
        "test": ["-m", "pytest", "-q", *xdist_workers(argv[1:])],
    }
    if not argv or argv[0] not in jobs:
        print(f"usage: python3 scripts/dev.py {{{'|'.join(jobs)}}} [args...]", file=sys.stderr)
        return 2
    py = ensure_env()
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    return subprocess.call([str(py), *map(str, jobs[argv[0]]), *argv[1:]], cwd=ROOT, env=env)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
