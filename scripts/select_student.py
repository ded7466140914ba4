"""Choose among candidate student files on tune data only (``distill.eval.select``) and record the choice in the file.

    python scripts/select_student.py --teacher mnist16 --steps 1 \\
        --candidates runs/x_raw.safetensors runs/x_ema.safetensors --out results/mnist16/students/x_mnist16.safetensors

Each candidate is sampled at --steps on noise seeds --seed.. (default 900,000: never a reporting seed) and scored by
FID against the mnist16 tune split (1,000 training digits no reported number uses); the lowest is copied to --out
with metadata ``selection`` = {rule, split, seeds, steps, candidates' FIDs, chosen, command}. A single candidate is a
record, not a choice: its tune FID is stored under the rule "one candidate", and ``--history`` says how the file was
picked before (e.g. between EMA and raw weights on the reporting split, when the run's checkpoints are gone). Recorded
in place (--out the candidate itself) the file is not changed, as its content hash is what students distilled from it
name as their teacher: the record goes to ``<stem>.selection.json`` beside it (``distill.eval.select.read_selection``
reads either).
"""

from __future__ import annotations

import argparse
import os as _os
import shlex
import sys as _sys
from pathlib import Path

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

from distill.engine.paths import check_output_file  # noqa: E402
from distill.eval import bench as lib  # noqa: E402
from distill.eval.select import check_tune_seed, choose, tune_fids, write_record_beside, write_selected  # noqa: E402
from students import load_student  # noqa: E402
from teachers import load_teacher  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="mnist16")
    p.add_argument("--candidates", nargs="+", required=True, type=Path)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=900_000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--history", default=None, help="how the candidates themselves came to be (recorded as is): e.g. "
                   "an earlier choice that can no longer be redone on tune data")
    args = p.parse_args(argv)
    try:
        check_output_file(args.out, "--out")
        check_tune_seed(args.seed)
        if args.steps < 1 or args.num_samples < 2:
            raise ValueError(f"--steps and --num-samples must be at least 1 and 2, got {args.steps} and {args.num_samples}")
        if len({c.resolve() for c in args.candidates}) != len(args.candidates):
            raise ValueError("--candidates names the same file twice; allowed: distinct files")
        teacher = load_teacher(args.teacher)
        students = {}
        for path in args.candidates:
            if not path.is_file():
                raise FileNotFoundError(f"no candidate student file at {str(path)!r}")
            students[str(path)] = load_student(str(path))
            lib.check_student(teacher, path.stem, students[str(path)], near=path.parent)
            if args.steps not in students[str(path)].sampling_steps:
                raise ValueError(f"{path} samples with {students[str(path)].sampling_steps} steps, not {args.steps}")
    except (ValueError, FileNotFoundError) as e:
        _sys.exit(f"error: {e}")
    fids = tune_fids(teacher, students, args.steps, args.num_samples, args.seed, args.batch_size)
    chosen = choose(fids)
    rule = ("lowest FID against the tune split" if len(fids) > 1
            else "one candidate: no choice among files; its FID against the tune split recorded")
    record = {"rule": rule, "split": "tune", "seeds": [args.seed, args.seed + args.num_samples - 1],
              "steps": args.steps, "candidates": fids, "chosen": chosen,
              "command": "python scripts/select_student.py " + shlex.join(argv if argv is not None else _sys.argv[1:])}
    if args.history:
        record["history"] = args.history
    if len(fids) == 1 and Path(chosen).resolve() == args.out.resolve():  # a record in place: the file stays byte-identical
        print(f"recorded beside it: {write_record_beside(args.out, record)}")
    else:
        write_selected(Path(chosen), args.out, record)
    for name, fid in fids.items():
        print(f"{'*' if name == chosen else ' '} {name}: tune FID {fid:.3f}")
    print(f"chose {chosen} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
