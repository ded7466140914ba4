"""Train a teacher: a diffusers UNet2DModel on images or a ToyMLP on 2-D toys.

    python scripts/train_teacher.py --config configs/teachers/mnist16.yaml
    accelerate launch scripts/train_teacher.py --config configs/teachers/ring8_mlp.yaml --set max_steps=2000 optim.lr=5e-4

The config is a run config (``teacher: untrained``, the ``diffusion`` objective; teachers/training.py), the same one
``scripts/distill.py --config`` takes. This command differs only in resuming by itself: from the latest complete
checkpoint in <output_dir>/checkpoints unless --no-resume (then a folder that already has checkpoints is refused).
"""

from __future__ import annotations

import os as _os
import sys as _sys

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

import argparse
import sys

from distill.core.cores import configure_threads, describe
from distill.engine.config import ConfigError, parse_overrides
from distill.engine.lock import FolderInUse, launched_rank
from distill.engine.run_config import load_run_config
from teachers.training import UNTRAINED, is_teacher_run, train


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys (dotted for nested)")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--no-resume", action="store_true")
    args = p.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
        if args.output_dir:
            overrides["output_dir"] = args.output_dir
        if args.max_steps is not None:
            overrides["max_steps"] = args.max_steps
        cfg = load_run_config(args.config, overrides)
        if not is_teacher_run(cfg):
            raise ConfigError(f"train_teacher.py trains a teacher from scratch (config key teacher: {UNTRAINED}); "
                              f"this config distils teacher {cfg.teacher!r}: run scripts/distill.py --config {args.config}")
        plan = configure_threads(cfg.threads, cfg.interop_threads)
        if launched_rank() == 0:
            print(describe(plan), flush=True)
        train(cfg, resume=None if args.no_resume else "latest", log=lambda m: print(m, flush=True))
    except FolderInUse as e:  # another process writes this run folder: nothing was changed
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except (ConfigError, ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
