"""Empirical model statistics of DPM-Solver-v3 for any teacher (distill/solvers/prepared/dpm_v3/ems.py), for ``--solvers dpm_solver_v3``.

    python scripts/compute_ems.py --teacher mnist16 --data mnist16 [--n-lams 60 --num-samples 384 --batch-size 128]
    python scripts/compute_ems.py --teacher gmm:aniso2d            # analytic teachers: exact data samples

Writes runs/prepared/<teacher hash[:16]>/ems.safetensors (or --out), tied to the teacher's hash: a sampler refuses it
for another teacher. Resumable: every finished unit (one grid point of one pass) is kept in <out>.state.pt; rerunning
the same command continues, and a state made with another teacher or other settings is refused. Progress: tqdm.
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
from distill.engine.paths import check_resumable_output
from distill.eval.bench import check_device
from distill.solvers.prepared import files as prepared
from distill.solvers.prepared.dpm_v3.ems import EmsConfig, EmsRun
from teachers import load_teacher


@reports_write_errors  # a full disk or a read-only folder: one sentence, the files before kept
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="gmm:<preset>[@schedule], a zoo name (mnist16) or a diffusers folder")
    p.add_argument("--data", default=None, help="dataset the statistics are taken on (mnist16, hf:<name or folder>); "
                   "default: exact samples of an analytic teacher")
    p.add_argument("--split", default="train")
    p.add_argument("--unconditional", action="store_true", help="statistics of the unconditional model (label -1)")
    p.add_argument("--n-lams", type=int, default=EmsConfig.n_lams, help="grid intervals, uniform in log-SNR")
    p.add_argument("--num-samples", type=int, default=EmsConfig.num_samples)
    p.add_argument("--batch-size", type=int, default=EmsConfig.batch_size)
    p.add_argument("--smooth", type=int, default=EmsConfig.smooth, help="half-width of the moving average of dl/dlam")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="default: runs/prepared/<teacher hash[:16]>/ems.safetensors")
    args = p.parse_args(argv)
    try:
        check_device(args.device)
        teacher = load_teacher(args.teacher)
        out, state = check_resumable_output(args.out or prepared.default_path("ems", teacher), "--out")
        if hasattr(teacher, "to"):
            teacher.to(args.device)
        cfg = EmsConfig(args.n_lams, args.num_samples, args.batch_size, args.smooth, args.seed)
        x0, labels = prepared.teacher_data(teacher, args.data, args.split, n=max(args.num_samples, 1), seed=args.seed,
                                           unconditional=args.unconditional)
        if labels is None and teacher.num_classes:
            labels = x0.new_full((len(x0),), -1).long()
        run = EmsRun(teacher.denoise, teacher.schedule, x0, labels, cfg, teacher_hash=teacher.hash, state_path=state,
                     device=args.device)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    ems = run.run()
    minutes = float(run.state.get("minutes", 0.0))
    ems.meta = {**(ems.meta or {}), "teacher": teacher.name, "data": args.data or "exact samples",
                "labels": "none" if labels is None else ("uncond" if args.unconditional else "data labels"),
                "minutes": f"{minutes:.2f}"}
    ems.save(out)
    print(f"wrote {out} ({minutes:.1f} min of computation, all runs together)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
