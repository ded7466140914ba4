"""Progressive distillation's halving rounds N -> N/2 -> ... -> final as one resumable command (Salimans & Ho 2022).

    python scripts/progressive.py --config configs/distill/progressive_ring8.yaml --output-dir runs/progressive_ring8
                                  [--final-steps 1] [--set key=value ...]

Round N is an ordinary distillation run (``objective.student_steps = N``) in ``<output-dir>/steps-<N>``. The first
round uses the config's teacher and student (for a network teacher, ``student.arch: teacher`` copies its weights,
as in the paper); every later round starts from the previous round's student (``init_from``), which is also its
teacher (``teacher: student:<file>``), with fresh optimizers and the step counter at 0, so the config's
``optim.lr_schedule: linear`` anneals the LR to 0 within each round. Each round's student is exported as
``steps-<N>/student.safetensors`` (its N-step DDIM grid, teacher hash and lineage in the metadata); ``rounds.json``
lists them with their cost. Killed in any round, the same command continues: finished rounds are skipped, the
interrupted one resumes from its newest valid checkpoint (bit-identical to an uninterrupted chain on CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import yaml

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

from distill.core.atomic import write_text  # noqa: E402
from distill.engine.checkpoint import latest_valid_checkpoint  # noqa: E402
from distill.engine.config import ConfigError, merge, parse_overrides, read_yaml  # noqa: E402
from distill.engine.export import STUDENT_FILE, read_student_file  # noqa: E402
from distill.engine.run_config import load_run_config  # noqa: E402
from distill.engine.run_files import CONFIG_FILE, RESUME_FREE_KEYS, config_changes, flat, follow_move  # noqa: E402
from distill.engine.train import NonFiniteError, train, updates_and_seconds  # noqa: E402
from students import build_student  # noqa: E402
from teachers import load_teacher  # noqa: E402


def round_steps(first: int, final: int) -> list[int]:
    """[first, first / 2, ..., final]; ``first`` must be ``final`` times a power of two."""
    steps = [first]
    while steps[-1] > final and steps[-1] % 2 == 0:
        steps.append(steps[-1] // 2)
    if final < 1 or steps[-1] != final:
        raise ConfigError(f"objective.student_steps ({first}) must be --final-steps ({final}) times a power of two")
    return steps


def round_overrides(base: dict, n: int, folder: Path, parent: Path | None) -> dict:
    """The config of round ``n``: the user's overrides, N, its folder, and (after round 1) the parent as teacher + init."""
    over = merge(base, {"objective": {"student_steps": n}, "output_dir": str(folder)})
    if parent is not None:
        over = merge(over, {"teacher": f"student:{parent}", "init_from": str(parent), "init_from_sha256": None})
    return over


def has_checkpoints(folder: Path) -> bool:
    root = folder / "checkpoints"
    return root.is_dir() and any(p.name.startswith("step-") for p in root.iterdir())


def round_cost(folder: Path) -> dict:
    """Updates and seconds of a finished round (``distill.engine.train.updates_and_seconds``)."""
    updates, seconds = updates_and_seconds(folder)
    return {"updates": updates, "seconds_approx": round(seconds, 1)}


# keys a finished round's config may differ in on a rerun: only how it was logged and checkpointed (its length may not)
FINISHED_FREE_KEYS = tuple(k for k in RESUME_FREE_KEYS if k != "max_steps")


def check_finished_round(config: str, overrides: dict, n: int, folder: Path, parent: Path | None) -> None:
    """Refuse a finished round whose student file cannot be read, or whose saved config.yaml differs from the config
    this command would train it with (another lr, max_steps, teacher, ...): its students would be reported as done."""
    done = folder / STUDENT_FILE
    try:
        read_student_file(done)
    except ValueError as e:
        raise ValueError(f"the finished round {n}'s student file {str(done)!r} cannot be used ({e}); delete it to "
                         f"redo that round, or choose another --output-dir") from None
    saved_file = folder / CONFIG_FILE
    if not saved_file.is_file():  # a round written before configs were kept next to it
        return
    current = dataclasses.asdict(load_run_config(config, round_overrides(overrides, n, folder, parent)))
    saved = follow_move(yaml.safe_load(saved_file.read_text()), current)  # a chain folder moved or copied: its own files
    if current["mixed_precision"] is None:  # null: the launcher's, which the trainer resolved and saved
        current["mixed_precision"] = saved.get("mixed_precision")
    changed = config_changes(saved, current, FINISHED_FREE_KEYS)
    if changed:
        shown = ", ".join(f"{k} ({flat(saved).get(k)!r} -> {flat(current).get(k)!r})" for k in changed)
        raise ConfigError(f"the config differs from the one the finished round in {str(folder)!r} was trained with in "
                          f"{shown}; rerun the chain with the same config (only {', '.join(FINISHED_FREE_KEYS[:3])} "
                          f"may change), or choose another --output-dir")


def run_rounds(config: str, out: Path, overrides: dict, final: int = 1, log=print, stop_at: tuple[int, int] | None = None) -> list[Path]:
    """Run (or continue) every round; ``stop_at=(N, step)`` stops round N after checkpointing that step (tests)."""
    raw = merge(read_yaml(config), overrides)
    first = int((raw.get("objective") or {}).get("student_steps", 4))
    steps = round_steps(first, final)
    for k, n in enumerate(steps):  # every finished round checked before any work
        if (out / f"steps-{n}" / STUDENT_FILE).exists():
            parent = out / f"steps-{steps[k - 1]}" / STUDENT_FILE if k else None
            check_finished_round(config, overrides, n, out / f"steps-{n}", parent)
    parent, files, rounds = None, [], []  # round 1: the config's teacher (and its init_from, if any)
    for k, n in enumerate(steps):
        folder = out / f"steps-{n}"
        done = folder / STUDENT_FILE
        if done.is_file():
            log(f"round {k + 1} ({n} steps): done, {done}")
        else:
            cfg = load_run_config(config, round_overrides(overrides, n, folder, parent))
            if cfg.optim.lr_schedule != "linear":
                log(f"note: optim.lr_schedule is {cfg.optim.lr_schedule!r}; the paper anneals linearly to 0 in each round")
            resume = "latest" if has_checkpoints(folder) and latest_valid_checkpoint(folder / "checkpoints")[0] else None
            log(f"round {k + 1} ({2 * n} -> {n} steps): {'resuming' if resume else 'starting'} in {folder}")
            t0 = time.time()
            stop = stop_at[1] if stop_at is not None and stop_at[0] == n else None
            if train(cfg, load_teacher=load_teacher, build_student=build_student, resume=resume, log=log, stop_at=stop) is None:
                return files
            log(f"round {k + 1} ({n} steps): {time.time() - t0:.1f} s this session, student {done}")
        rounds.append({"student_steps": n, "teacher_steps": 2 * n, "student": str(done), **round_cost(folder)})
        files.append(done)
        parent = done
    write_text(out / "rounds.json", json.dumps(rounds, indent=1))
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--final-steps", type=int, default=1)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys of every round")
    args = p.parse_args(argv)
    try:
        files = run_rounds(args.config, Path(args.output_dir), parse_overrides(args.set), args.final_steps,
                           log=lambda m: print(m, flush=True))
    except (ConfigError, FileNotFoundError, NonFiniteError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    print("students: " + ", ".join(map(str, files)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
