"""Train the AMED time predictor (distill/solvers/prepared/amed/predictor.py) for a teacher: AMED-Solver (--solver amed) or AMED-Plugin
(--solver euler_amed | dpmpp_2m_amed), on teacher trajectories through the grids the sampler will use.

    python scripts/train_amed.py --teacher mnist16 --solver amed --nfe 2,4,6,8,10 [--batch-size 64 --num-batches 40]

Writes runs/prepared/<teacher hash[:16]>/amed.safetensors (or --out; name it per solver when training several),
tied to the teacher's hash, with the training minutes in its metadata. Then ``sample(..., solver="amed",
amed=<file>)`` or, in the bench, ``--variant NAME=amed:amed=<file>``. Resumable: the state (predictor, optimizer,
batch, RNG) is saved every --save-every batches to <out>.state.pt; rerunning the same command continues (another
teacher's or settings' state is refused). Progress: tqdm with the loss.
"""

from __future__ import annotations

import os as _os
import sys as _sys

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

import argparse
import sys
from pathlib import Path

from distill.core.atomic import reports_write_errors
from distill.core.grids import GRIDS
from distill.engine.paths import check_resumable_output
from distill.eval.bench import parse_int_list
from distill.solvers.prepared import files as prepared
from distill.solvers.prepared.amed.predictor import PLUGIN_RULES
from distill.solvers.prepared.amed.train import AmedConfig, train_amed
from teachers import load_teacher


@reports_write_errors  # a full disk or a read-only folder: one sentence, the files before kept
def main(argv=None) -> int:
    d = AmedConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--solver", default=d.solver, choices=sorted(PLUGIN_RULES))
    p.add_argument("--nfe", default=",".join(map(str, d.nfe)), help="NFEs to train for, one per batch in turn")
    p.add_argument("--grid", default=d.grid, choices=GRIDS, help="grid kind of the sampler (the bench's --grid)")
    p.add_argument("--final", default=d.final, choices=("direct", "clean"))
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--num-batches", type=int, default=d.num_batches)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--teacher-solver", default=d.teacher_solver)
    p.add_argument("--teacher-substeps", type=int, default=d.teacher_substeps)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--scale-dir", type=float, default=d.scale_dir)
    p.add_argument("--unconditional", action="store_true", help="train a class-conditional teacher's label -1")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--out", type=Path, default=None, help="default: runs/prepared/<teacher hash[:16]>/amed.safetensors")
    args = p.parse_args(argv)
    try:
        teacher = load_teacher(args.teacher)
        cfg = AmedConfig(args.solver, tuple(parse_int_list(args.nfe, "--nfe")), args.grid, args.final, args.batch_size,
                         args.num_batches, args.lr, args.teacher_solver, args.teacher_substeps, args.hidden, args.scale_dir,
                         args.seed, args.unconditional, args.save_every)
        cfg.validate()
        out, state = check_resumable_output(args.out or prepared.default_path("amed", teacher), "--out")
        predictor = train_amed(teacher, cfg, state_path=state)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    predictor.save(out)
    print(f"wrote {out} ({predictor.meta['minutes']} min of training)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
