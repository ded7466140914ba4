"""One-command hardware check: distillation speed and peak memory, DeepSpeed ZeRO-2, solver throughput vs diffusers.

    python scripts/gpu_check.py                      # one CUDA GPU: the DDPM CIFAR-10 UNet (35.7 M), bf16, < 8 min
    python scripts/gpu_check.py --tiny --steps 3     # any machine: an 8x8 UNet, the same code path (CPU: float32)
    python scripts/gpu_check.py --out DIR            # writes DIR/<device>.json and DIR/<device>.md (default results/gpu)

Measures consistency distillation and SiD (steps/s after 2 warm-up steps, peak memory), a single-process DeepSpeed
ZeRO-2 run (GPU only; else "skipped: <reason>"), and dpmpp_2m / unipc at 10 NFE against diffusers' schedulers
(images/s). Random-init teacher, nothing downloaded; what and how: distill/eval/gpu_check.py.
"""

from __future__ import annotations

import os as _os
import sys as _sys

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from distill.core.atomic import reports_write_errors, write_text
from distill.eval.gpu_check import gpu_check, markdown, worker
from teachers import load_teacher


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/gpu"), help="folder of <device>.json and <device>.md")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: 40 on a GPU, 10 tiny)")
    p.add_argument("--tiny", action="store_true", help="the 8x8 CPU-size model even on a GPU (files named <device>-tiny)")
    p.add_argument("--keep", type=Path, default=None, help="keep the teacher, data and run folders here (default: a temp folder)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one training run from a spec file
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 2:
        p.error(f"--steps must be at least 2 (the first steps are warm-up), got {args.steps}")
    return args


@reports_write_errors  # a full disk or a read-only folder: one sentence, the files before kept
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        from students import build_student

        worker(args.worker, load_teacher, build_student)
        return 0
    command = shlex.join(["python", "scripts/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    log = lambda m: print(m, flush=True)  # noqa: E731
    script = Path(__file__).resolve()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        results = gpu_check(args.keep, script, command, args.tiny, args.steps, load_teacher, log)
    else:
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
            results = gpu_check(Path(work), script, command, args.tiny, args.steps, load_teacher, log)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / results["device"]["slug"]
    write_text(stem.with_suffix(".json"), json.dumps(results, indent=2) + "\n")  # atomic (distill.core.atomic)
    table = markdown(results)
    write_text(stem.with_suffix(".md"), table)
    print(table, flush=True)
    print(f"wrote {stem}.json and {stem}.md", flush=True)
    rows = {**results["training"], **results["sampling"]["solvers"]}
    failed = [name for name, row in rows.items() if "failed" in row]
    if failed:
        print(f"failed: {', '.join(failed)} (see the json)", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
