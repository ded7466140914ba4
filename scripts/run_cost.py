"""Write a student's training cost (the bench's ``<student>.cost.json``) from the run folder(s) that made it.

    python scripts/run_cost.py RUN_DIR [RUN_DIR ...] --hardware "1 thread of a 2-core x86_64 CPU, no GPU" \
        --teacher-nfe-per-step 128 [--extra-teacher-nfe 192000 --extra-seconds 482] --out student.cost.json

Several run folders add up (a progressive round's student also cost every earlier round; a reflow student also cost
the round before it): ``steps`` and ``wall_seconds`` are summed over them, read from each folder's metrics.jsonl
(``distill.engine.train.updates_and_seconds``: seconds per step times the steps logged, the student's rows; ``--up-to N``:
the last run's first N steps, for a checkpoint's export); ``batch_size`` is the runs' (they must agree);
``trained_params`` counts the exported student. Teacher network evaluations are the objective's own count per update
times the updates (``--teacher-nfe-per-step``: e.g. progressive 2 x batch, consistency with a 2-evaluation solver
step 2 x batch, reflow 0; ``--teacher-nfe-per-step-last`` when the last run's objective differs, e.g. dmd2 batch / 5;
``--teacher-nfe-per-run`` one value per folder for a lineage of several objectives) plus what was spent outside
training (``--extra-teacher-nfe``: a trajectory cache's samples x its NFE), whose time ``--extra-seconds`` adds to the
wall time. Keys as ``distill.eval.bench.COST_KEYS``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

from distill.core.atomic import reports_write_errors, write_text  # noqa: E402
from distill.engine.export import STUDENT_FILE  # noqa: E402
from distill.engine.paths import check_output_file  # noqa: E402
from distill.engine.train import CONFIG_FILE, updates_and_seconds  # noqa: E402


def run_batch_size(folder: Path) -> int:
    import yaml

    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {folder}; pass the run folder a distillation wrote")
    return int(yaml.safe_load(path.read_text())["batch_size"])


def trained_params(student: Path) -> int:
    """Parameters in the student file (every tensor: the exported network's weights)."""
    import math

    from safetensors import safe_open

    with safe_open(str(student), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def run_cost(folders: list[Path], hardware: str, teacher_nfe_per_step: float | None, extra_teacher_nfe: int = 0,
             student: Path | None = None, extra_seconds: float = 0.0, up_to: int | None = None,
             teacher_nfe_per_step_last: int | None = None, teacher_nfe_per_run: list[float] | None = None) -> dict:
    if not folders:
        raise ValueError("no run folder given; pass at least one")
    if teacher_nfe_per_step is None and teacher_nfe_per_run is None:
        raise ValueError("no teacher evaluation rate given; pass --teacher-nfe-per-step or --teacher-nfe-per-run")
    if teacher_nfe_per_run is not None and teacher_nfe_per_step_last is not None:
        raise ValueError("--teacher-nfe-per-run already gives the last run's rate; drop --teacher-nfe-per-step-last")
    if teacher_nfe_per_run is not None and len(teacher_nfe_per_run) != len(folders):
        raise ValueError(f"--teacher-nfe-per-run has {len(teacher_nfe_per_run)} values for {len(folders)} run folders; "
                         f"give one per run, in training order")
    if min(teacher_nfe_per_step or 0, extra_teacher_nfe, extra_seconds, teacher_nfe_per_step_last or 0,
           *(teacher_nfe_per_run or [])) < 0:
        raise ValueError("teacher evaluations and extra seconds must be >= 0")
    if up_to is not None and up_to < 1:
        raise ValueError(f"--up-to must be a positive step of the last run (the checkpoint's step), got {up_to}; allowed: 1 "
                         "up to the steps it logged")
    steps, seconds, batches, nfe = 0, 0.0, set(), extra_teacher_nfe
    for i, folder in enumerate(folders):
        last = i == len(folders) - 1
        n, s = updates_and_seconds(folder, up_to if last else None)
        steps, seconds = steps + n, seconds + s
        if teacher_nfe_per_run is not None:
            per_step = teacher_nfe_per_run[i]
        else:
            per_step = teacher_nfe_per_step_last if last and teacher_nfe_per_step_last is not None else teacher_nfe_per_step
        nfe += round(per_step * n)
        batches.add(run_batch_size(folder))
    if len(batches) != 1:
        raise ValueError(f"the runs' batch sizes differ ({sorted(batches)}); give runs of one batch size")
    student = student or folders[-1] / STUDENT_FILE
    if not student.is_file():
        raise FileNotFoundError(f"no exported student at {student}; export the last run first or pass --student")
    return {"steps": steps, "batch_size": batches.pop(), "wall_seconds": round(seconds + extra_seconds),
            "hardware": hardware, "teacher_nfe": nfe,
            "trained_params": trained_params(student)}


def add_parent(cost: dict, path: Path) -> dict:
    """Add the cost of the student a lineage started from (its ``.cost.json``: steps, seconds, teacher evaluations)."""
    try:
        parent = json.loads(path.read_text())
        values = [parent[k] for k in ("steps", "batch_size", "wall_seconds", "teacher_nfe")]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--parent-cost {path} is not a readable cost file with steps, batch_size, wall_seconds and "
                         f"teacher_nfe ({type(e).__name__})") from None
    if not all(isinstance(v, (int, float)) and v >= 0 for v in values):
        raise ValueError(f"--parent-cost {path} has a negative or non-numeric field; allowed: numbers >= 0")
    if parent["batch_size"] != cost["batch_size"]:
        raise ValueError(f"--parent-cost {path} has batch size {parent['batch_size']}, the runs {cost['batch_size']}; "
                         f"allowed: the same batch size")
    return {**cost, "steps": cost["steps"] + parent["steps"], "wall_seconds": cost["wall_seconds"] + round(parent["wall_seconds"]),
            "teacher_nfe": cost["teacher_nfe"] + parent["teacher_nfe"]}


def parse_rates(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--teacher-nfe-per-run is {text!r}; allowed: comma-separated numbers, one per run folder") from None


@reports_write_errors  # a full disk or a read-only folder: one sentence, the old cost file kept
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders, in training order")
    p.add_argument("--hardware", required=True, help='e.g. "1 thread of a 2-core x86_64 CPU, no GPU"')
    p.add_argument("--teacher-nfe-per-step", type=int, help="teacher evaluations per training step of every run "
                   "(required unless --teacher-nfe-per-run is given)")
    p.add_argument("--extra-teacher-nfe", type=int, default=0, help="teacher evaluations outside training")
    p.add_argument("--extra-seconds", type=float, default=0.0, help="seconds outside training (a trajectory cache)")
    p.add_argument("--up-to", type=int, help="count only the last run's first N steps (a checkpoint's export)")
    p.add_argument("--teacher-nfe-per-step-last", type=float,
                   help="the last run's teacher evaluations per step when its objective differs (e.g. dmd2: batch / 5)")
    p.add_argument("--teacher-nfe-per-run", help="comma-separated teacher evaluations per step, one per run folder "
                   "(a lineage of different objectives, e.g. 128,...,64,64); used instead of --teacher-nfe-per-step, "
                   "not with --teacher-nfe-per-step-last")
    p.add_argument("--student", help="the student file whose parameters count (default: the last run's export)")
    p.add_argument("--parent-cost", help="the .cost.json of the student the first run started from (init_from), "
                   "whose run folders are gone: its steps, seconds and teacher evaluations are added")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    try:
        check_output_file(a.out, "--out")
        per_run = None if a.teacher_nfe_per_run is None else parse_rates(a.teacher_nfe_per_run)
        cost = run_cost([Path(r) for r in a.runs], a.hardware, a.teacher_nfe_per_step, a.extra_teacher_nfe,
                        Path(a.student) if a.student else None, a.extra_seconds, a.up_to, a.teacher_nfe_per_step_last,
                        per_run)
        if a.parent_cost:
            cost = add_parent(cost, Path(a.parent_cost))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_text(a.out, json.dumps(cost) + "\n")  # atomic: never a 0-byte cost.json
    print(json.dumps(cost))
    return 0


if __name__ == "__main__":
    sys.exit(main())
