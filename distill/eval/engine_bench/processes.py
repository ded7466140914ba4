"""Measuring a child process's memory, for the memory benchmark and its parts: /proc/self/status, the resident bytes
of a folder's mappings, and a fresh one-thread child of ``scripts/engine_memory.py`` with its peak RSS from ``wait4``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from distill.eval.engine_bench import ROOT

MB = 2**20


def mib(b: int) -> str:
    return f"{b / MB:.1f}"


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS), RssAnon, RssFile of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


SCRIPT = ROOT / "scripts" / "engine_memory.py"  # the front end, run again for each child process


def mapped_rss(folder: Path) -> int:
    """Resident bytes of this process's mappings of files under ``folder`` (/proc/self/smaps)."""
    total, inside, prefix = 0, False, str(Path(folder).resolve()) + os.sep
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if head and not head[0].endswith(":"):  # a mapping's first line: address perms offset dev inode [path]
            inside = len(head) == 6 and head[5].startswith(prefix)
        elif inside and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


def run_child(spec: dict) -> dict:
    """Run ``spec`` in a fresh process (one thread); its report plus ``ru_maxrss`` from ``wait4``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.NamedTemporaryFile("r", suffix=".json") as report:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "--child", json.dumps({**spec, "report": report.name})], env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise RuntimeError(f"child {spec['kind']} failed with exit code {proc.returncode}")
        return {**json.loads(Path(report.name).read_text()), "ru_maxrss": usage.ru_maxrss * 1024}
