"""Write results/LEADERBOARD.md from a bench folder's CSV (never edit that file by hand).

    python scripts/leaderboard.py --results results/mnist16 --out results/LEADERBOARD.md --readme README.md

Every student and the best solver at 1, 2, 4 and 8 NFE with FID +- spread, KID, precision, recall, memorization
and training cost; the data floor, the training data and the converged teacher at the same sample count; the
command that makes each row (distill.eval.leaderboard). --readme also replaces the README's leaderboard block
(between its two marker lines) with the table's first rows, without the commands.

Every student file in --students (default: <results>/students) must have a row, in --results or in a --guided
folder (guided students, in a table of their own); otherwise the script stops, naming the files and the bench command
that adds them. --exclude FILE keeps a file off the board on purpose (e.g. an intermediate progressive round):

    python scripts/leaderboard.py --results results/mnist16 --guided results/mnist16_cfg2 --guided results/mnist16_cd_w1 \
        --exclude progressive_mnist16_16.safetensors --exclude progressive_mnist16_32.safetensors
"""

from __future__ import annotations

import os as _os
import sys as _sys

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

import argparse
import shlex
import sys
from pathlib import Path

from distill.engine.paths import check_output_file
from distill.eval.bench import CSV, read_bench_rows
from distill.eval.leaderboard import (
    check_students_listed,
    leaderboard_markdown,
    leaderboard_table,
    read_paired_rows,
    read_prepared,
    replace_block,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("results/mnist16"), help="a bench output folder")
    p.add_argument("--out", type=Path, default=Path("results/LEADERBOARD.md"))
    p.add_argument("--readme", type=Path, default=None, help="a README with a leaderboard block to refresh")
    p.add_argument("--readme-rows", type=int, default=10, help="table rows shown in the README (without the command column)")
    p.add_argument("--prepared", type=Path, action="append", default=[],
                   help="a bench folder of prepared samplers with its prepared.json (repeatable; see distill.eval.leaderboard)")
    p.add_argument("--guided", type=Path, action="append", default=[], metavar="DIR",
                   help="a bench folder of the same teacher, samples and reference under classifier-free guidance: its "
                   "students go into a guided table (repeatable)")
    p.add_argument("--paired", type=Path, action="append", default=[], metavar="CSV",
                   help="a paired.csv of scripts/paired_bench.py (repeatable: the main and the guided folders): adds the "
                   "delta to the teacher with its 95%% interval, the verdict, the distance to the teacher and FID-infinity")
    p.add_argument("--students", type=Path, default=None, metavar="DIR",
                   help="the student files that must each have a row (default: <results>/students, when it exists)")
    p.add_argument("--exclude", action="append", default=[], metavar="FILE",
                   help="a student file (path or file name) left off the board on purpose (repeatable)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python scripts/leaderboard.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    try:
        check_output_file(args.out, "--out")
        if args.readme is not None:
            check_output_file(args.readme, "--readme")
            if not args.readme.is_file():
                raise FileNotFoundError(f"--readme {str(args.readme)!r} does not exist; allowed: a README with a leaderboard block")
        if args.readme_rows < 1:
            raise ValueError(f"--readme-rows must be at least 1 (table rows shown in the README), got {args.readme_rows}")
        if not (args.results / CSV).is_file():
            raise FileNotFoundError(f"no {CSV} in {args.results}; run scripts/bench.py --out {args.results} first")
        rows = read_bench_rows(args.results / CSV)
        prepared = [read_prepared(folder) for folder in args.prepared]
        guided = []
        for folder in args.guided:
            if not (folder / CSV).is_file():
                raise FileNotFoundError(f"no {CSV} in {folder} (--guided)")
            guided.append((str(folder), read_bench_rows(folder / CSV)))
        for path in args.paired:
            if not path.is_file():
                raise FileNotFoundError(f"no paired bench table at {path} (--paired names a paired.csv of scripts/paired_bench.py)")
        paired = read_paired_rows(args.paired)
        text = leaderboard_markdown(rows, str(args.results), command, prepared, guided, paired, [str(p) for p in args.paired])
        students = args.students or args.results / "students"
        if args.students is not None and not students.is_dir():
            raise FileNotFoundError(f"no student folder at {students} (--students)")
        if students.is_dir():
            check_students_listed(students, rows, str(args.results), guided, args.exclude)
        readme = None
        if args.readme is not None:
            lines = leaderboard_table(rows, str(args.results), commands=False, prepared=prepared, paired=paired,
                                      ranked=True)[:2 + args.readme_rows]
            order = " (ranked by the paired bench's FID at its N)" if paired else ""
            block = ("\n".join(lines) + f"\n\nThe first {args.readme_rows} rows{order}; the full table, with every student and the "
                     f"command of each row: [{args.out}]({args.out}).\n")
            readme = replace_block(args.readme.read_text(), block)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    args.out.write_text(text)
    if readme is not None:
        args.readme.write_text(readme)
    print(f"wrote {args.out}" + (f" and the leaderboard block of {args.readme}" if readme is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
