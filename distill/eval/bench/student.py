"""The bench's side of a distilled student: its one sampling call, the check that it comes from the bench's teacher,
its training cost (from its file or a sidecar) and ``load_students``, which the caller gives its loader (distill
never imports the ``students`` package)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from distill.core.safe_files import parse_json, read_json
from distill.engine.paths import file_sha256
from distill.eval.bench.config import COST_KEYS


def student_sample(student, noise: torch.Tensor, steps: int, cond: torch.Tensor | None, seed: int,
                   guidance_scale: float | None = None) -> torch.Tensor:
    """The bench's one call into a student (DESIGN.md, contract 5): ``student.sample(noise, steps=k, cond=labels)``,
    under torch's default generator seeded with ``seed`` (restored afterwards), so multistep re-noising repeats.
    A guidance-distilled student (one that takes ``w``) gets the bench's guidance scale as its input: still one
    network call, 1 NFE, per step."""
    devices = [noise.device] if noise.is_cuda else []
    takes_w = guidance_scale is not None and "w" in getattr(student, "conditions", {})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return student.sample(noise, steps=steps, cond=cond, **({"w": guidance_scale} if takes_w else {}))


def check_student(teacher, name: str, student, allow_other_teacher: bool = False, near: str | Path | None = None,
                  use: tuple[str, str] = ("bench", "bench")) -> None:
    """A student that records the hash of the teacher it was distilled from, or of its chain's first teacher, must
    match the bench's teacher (unless ``allow_other_teacher``; its rows then carry both hashes). ``near``: the folder
    of the student's file, searched by hash for the parents of a chain recorded before ``root_teacher_hash``.
    ``use``: the teacher's role and the verb of the sentence (another command: ``("reference", "measure")``)."""
    want = student_teacher_hash(student)
    if want and want != teacher.hash and not allow_other_teacher and student_root_hash(student, near) != teacher.hash:
        made_from = student.info.get("teacher") or "another teacher"
        raise ValueError(f"student {name!r} was distilled from {made_from!r} (teacher hash {want[:12]}), not from the {use[0]} "
                         f"teacher {teacher.name!r} ({teacher.hash[:12]}); pass --allow-other-teacher to {use[1]} it anyway")


def student_root_hash(student, near: str | Path | None = None) -> str:
    """The hash of the first teacher of a student's chain (a progressive round's student: the network teacher of
    round 1), ``distill.engine.lineage.root_teacher`` (parents also looked up by hash in ``near``); '' when its file
    records no teacher."""
    from distill.engine.lineage import root_teacher

    return root_teacher(getattr(student, "info", {}), near)[1] if student is not None else ""


def student_teacher_hash(student) -> str:
    """The hash of the teacher a student was distilled from ('' when its file does not record one)."""
    return str(getattr(student, "info", {}).get("teacher_hash", "")) if student is not None else ""


def student_cost(path: str, cost_file: str | None) -> dict:
    """A student's training cost: the file's own ``training_cost`` metadata (a JSON object), else ``cost_file``,
    else ``<student>.cost.json`` beside it, else nothing. Keys: ``COST_KEYS``; others are refused."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        text = (f.metadata() or {}).get("training_cost")
    if text is not None:
        source = f"the 'training_cost' metadata field of student file {str(path)!r}"
        return check_cost(parse_json(text, source), source)
    sidecar = Path(path).with_suffix(".cost.json")
    cost_path = Path(cost_file) if cost_file else sidecar if sidecar.is_file() else None
    if cost_path is None:
        return {}
    if not cost_path.is_file():
        raise FileNotFoundError(f"no cost file at {cost_path} (--cost)")
    return read_cost_file(cost_path)


def check_cost(cost, source: str) -> dict:
    """``cost`` (parsed from ``source``, named in the sentence) if it is a JSON object of ``COST_KEYS`` whose fields but
    ``hardware`` are numbers >= 0 (they go on the cost plot's log axes); else ``ValueError``."""
    unknown = sorted(set(cost) - set(COST_KEYS)) if isinstance(cost, dict) else ["(not a JSON object)"]
    if unknown:
        raise ValueError(f"{source} has unknown cost keys {unknown}; allowed: {', '.join(COST_KEYS)}")
    for key, value in cost.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
        if key != "hardware" and not number:
            raise ValueError(f"{source} has cost field {key!r} = {value!r}; allowed: a number >= 0")
        if key == "hardware" and not isinstance(value, str):
            raise ValueError(f"{source} has cost field 'hardware' = {value!r}; allowed: a text naming the hardware")
    return cost


def read_cost_file(path: str | Path) -> dict:
    """A cost file (a student's ``.cost.json``, the bench's ``teacher_cost.json``), checked by ``check_cost``."""
    return check_cost(read_json(path, "cost file"), f"cost file {str(path)!r}")


def check_student_steps(students: dict, steps: list[int]) -> None:
    """Raise ValueError (one sentence) when a student's file does not record one of the step counts asked for."""
    for name, student in students.items():
        missing = [k for k in steps if k not in getattr(student, "sampling_steps", steps)]
        if missing:
            raise ValueError(f"student {name!r} samples with {', '.join(map(str, student.sampling_steps))} steps (the "
                             f"counts its file records), not {', '.join(map(str, missing))}; pass --student-steps with those")


def load_students(paths: list[str], teacher, load: Callable[[str], object], cost_files: list[str] = (),
                  allow_other_teacher: bool = False) -> tuple[dict, dict]:
    """{name: ``load(path)``} (``load``: ``students.load_student``, passed in by the caller; name: the file's stem, or
    its path when stems clash), each checked against the bench's teacher (``check_student``), and {name: extra CSV
    columns}: the file's path and its training cost (``student_cost``; ``cost_files``: one per path, or none)."""
    if not paths:
        return {}, {}
    if cost_files and len(cost_files) != len(paths):
        raise ValueError(f"--cost names {len(cost_files)} files for {len(paths)} students; allowed: one per student, in order")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"no student file at {', '.join(missing)}")
    stems = [Path(p).stem for p in paths]
    names = [s if stems.count(s) == 1 else p for s, p in zip(stems, paths)]
    loaded = {name: load(path) for name, path in zip(names, paths)}
    for (name, student), path in zip(loaded.items(), paths):
        check_student(teacher, name, student, allow_other_teacher, near=Path(path).parent)
    costs = [student_cost(p, c) for p, c in zip(paths, cost_files or [None] * len(paths))]
    columns = {name: {"student_path": p, "student_sha256": file_sha256(p), **{f"cost_{k}": v for k, v in cost.items()}}
               for name, p, cost in zip(names, paths, costs)}
    return loaded, columns
