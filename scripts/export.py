"""Export a trained student to one safetensors file (LoRA merged), optionally also as a diffusers folder.

    python scripts/export.py RUN_DIR_or_CHECKPOINT --out student.safetensors [--ema] [--diffusers DIR] [--keep-lora]

A run folder gives its final student (or, mid-run, its latest complete checkpoint's); --ema takes the
EMA weights. Load the result with ``students.load_student(path)`` and sample with ``.sample(noise, steps)``.
"""

from __future__ import annotations

import os as _os
import sys as _sys

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

import argparse
import json
import sys

from distill.export import check_diffusers_exportable, read_student_file, resolve_student_file, save_diffusers, save_student
from distill.paths import check_output_dir, check_output_file
from students import load_student


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a run folder, a checkpoint folder or a student file")
    p.add_argument("--out", required=True, help="the student.safetensors to write")
    p.add_argument("--ema", action="store_true", help="export the EMA of the student")
    p.add_argument("--diffusers", default=None, metavar="DIR", help="also save a UNet student as a diffusers folder")
    p.add_argument("--keep-lora", action="store_true", help="keep a LoRA adapter separate instead of merging it")
    args = p.parse_args(argv)
    try:
        check_output_file(args.out, "--out")
        if args.diffusers:
            check_output_dir(args.diffusers, "--diffusers")
        src = resolve_student_file(args.source, ema=args.ema, log=print)
        student = load_student(src)
        if args.diffusers:
            check_diffusers_exportable(student)  # before --out is written
        _, meta = read_student_file(src)
        config = json.loads(meta.get("training_config", "{}"))
        save_student(student, args.out, merge_lora=not args.keep_lora, training_config=config)
        if args.diffusers:
            save_diffusers(student, args.diffusers)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {src} -> {args.out}" + (f" and {args.diffusers}" if args.diffusers else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
