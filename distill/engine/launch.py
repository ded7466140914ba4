"""What the launcher asked for, so a run can say when accelerate started fewer processes than that.

accelerate 1.15 starts two CPU ranks only through its multi-GPU launcher (``--multi_gpu`` with
``ACCELERATE_USE_CPU=1``, or ``configs/accelerate/cpu_2proc.yaml``); ``--cpu --num_processes 2``, a plain
``--num_processes 2`` and a MULTI_CPU config start ONE process without a word (FACTS.md). The simple launcher
exports nothing that says how many were asked for, so this reads the launcher's own command line.
"""

from __future__ import annotations

import os
from pathlib import Path

FIX = ("on CPUs use `accelerate launch --config_file configs/accelerate/cpu_2proc.yaml ...` "
       "(or --multi_gpu with ACCELERATE_USE_CPU=1)")


def _parent_argv(pid: int | None = None) -> list[str]:
    try:
        raw = Path(f"/proc/{pid or os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def requested_processes(argv: list[str]) -> int | None:
    """``--num_processes N`` (or a ``--config_file`` with ``num_processes``) on an ``accelerate launch`` line."""
    if not any("accelerate" in a for a in argv[:3]):
        return None
    value = None
    for flag in ("--num_processes", "--config_file"):
        for i, arg in enumerate(argv[:-1]):
            if arg == flag:
                value = (int(argv[i + 1]) if argv[i + 1].isdigit() else None) if flag == "--num_processes" else _from_config(argv[i + 1])
            elif arg.startswith(flag + "="):
                rest = arg.split("=", 1)[1]
                value = (int(rest) if rest.isdigit() else None) if flag == "--num_processes" else _from_config(rest)
            if value is not None:
                return value
    return None


def _from_config(path: str) -> int | None:
    import yaml

    try:
        n = (yaml.safe_load(Path(path).read_text()) or {}).get("num_processes")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return n if isinstance(n, int) else None


def launch_warning(started: int, argv: list[str] | None = None) -> str | None:
    """A sentence when the launch asked for more processes than accelerate started, else None."""
    asked = requested_processes(_parent_argv() if argv is None else argv)
    if asked is None or asked <= started:
        return None
    return f"warning: the launch asked for {asked} processes but accelerate started {started}; {FIX}"
