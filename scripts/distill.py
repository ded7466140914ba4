"""Distill a teacher into a few-step student with any registered objective.

    python scripts/distill.py --config configs/distill/cd_ring8.yaml [--set key=value ...] [--output-dir DIR]
                              [--max-steps N] [--resume latest|CHECKPOINT] [--threads N] [--interop-threads N]
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/distill.py --config ...

A config with ``teacher: untrained`` trains a teacher (configs/teachers/*.yaml) and saves <output-dir>/teacher.
Nested keys are set with dots: --set objective.solver=euler student.sigma_data=1.0. Without --resume a
run folder that already has checkpoints is refused; --resume latest ignores incomplete checkpoints. A run folder
another process is writing is refused with exit status 2, changing nothing (distill.engine.lock).
torch's threads per process: --threads / config key threads, else OMP_NUM_THREADS, else the usable cores but one, divided
by the processes launched on this machine (distill/core/cores.py). The first line printed says which.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# This file is named like the ``distill`` package: drop its own folder from the import path.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

from distill.core.cores import configure_threads, describe  # noqa: E402
from distill.engine.config import ConfigError, LaunchError, parse_overrides  # noqa: E402
from distill.engine.lock import FolderInUse, launched_rank  # noqa: E402
from distill.engine.run_config import load_run_config  # noqa: E402
from distill.engine.train import NonFiniteError, train  # noqa: E402
from students import build_student  # noqa: E402
from teachers import load_teacher  # noqa: E402
from teachers.training import is_teacher_run  # noqa: E402
from teachers.training import train as train_teacher  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys (dotted for nested)")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--resume", default=None, metavar="latest|PATH")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch intra-op threads per process (config key threads; default: (usable cores - 1) / local processes)")
    p.add_argument("--interop-threads", type=int, default=None, metavar="N",
                   help="torch inter-op threads per process (config key interop_threads; default: as --threads)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
        if args.output_dir:
            overrides["output_dir"] = args.output_dir
        if args.max_steps is not None:
            overrides["max_steps"] = args.max_steps
        for key in ("threads", "interop_threads"):
            if getattr(args, key) is not None:
                overrides[key] = getattr(args, key)
        cfg = load_run_config(args.config, overrides)
        plan = configure_threads(cfg.threads, cfg.interop_threads)  # before any work (distill.core.cores)
        if launched_rank() == 0:
            print(describe(plan), flush=True)
        if is_teacher_run(cfg):  # teacher: untrained trains a teacher folder (teachers/training.py)
            train_teacher(cfg, resume=args.resume, log=lambda m: print(m, flush=True))
        else:
            train(cfg, load_teacher=load_teacher, build_student=build_student, resume=args.resume,
                  log=lambda m: print(m, flush=True))
    except FolderInUse as e:  # another process writes this run folder: nothing was changed
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except (ConfigError, FileNotFoundError, NonFiniteError, ValueError) as e:
        if launched_rank() == 0 or not isinstance(e, LaunchError):
            print(f"error: {e}", file=sys.stderr, flush=True)
        else:  # every rank's error: rank 0 says it, and the launcher stops this rank when rank 0 exits
            time.sleep(60)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
