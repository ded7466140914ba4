"""FID vs NFE of training-free solvers and distilled students on one teacher (exact metrics for gmm:* teachers).

    python scripts/bench.py --teacher mnist16 --solvers euler,heun,dpmpp_2m,unipc --nfe 1,2,3,4,5,6,8,10,20 \\
        --students s.safetensors --student-steps 1,2,4 --num-samples 2000 --seed 0 --out results/mnist16
    python scripts/bench.py --teacher gmm:ring8 --solvers all --nfe 3,5,10,20 --num-samples 1000 --out results/gmm
    python scripts/bench.py --plot-only --out results/mnist16
    python scripts/bench.py --teacher mnist16 --solvers "" --variant v3=dpm_solver_v3:ems=runs/prepared/<hash>/ems.safetensors \
        --nfe 2,3,4,5 --num-samples 2000 --out results/mnist16_fast

Writes fid_vs_nfe.csv (a row per method and NFE, plus the data floor and the training data at the same sample count and
reference), fid_vs_nfe.png, fid_headline.png (the best solver per NFE, the best student of each family, the teacher and
the floor), fid_vs_nfe.md (the table), fid_vs_cost.png (when students record their training cost) and samples/<method>.png.
Resumable: cells already in the CSV with the same settings are skipped. Sample i uses noise seed (seed + i) in every cell;
class labels cycle 0..K-1 (--unconditional: -1). Solvers that cannot spend an NFE exactly are skipped. One bench writes
an --out at a time: a second one is refused with exit status 2, changing nothing.
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

from distill.core.atomic import reports_write_errors
from distill.core.cores import configure_threads
from distill.core.grids import GRIDS
from distill.data import MNIST16_SPLITS
from distill.engine.lock import FolderInUse, FolderLock
from distill.engine.paths import check_output_dir
from distill.eval import bench as lib
from distill.solvers import SOLVERS
from teachers import load_teacher


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", help="gmm:<preset>[@schedule], a zoo name (mnist16) or a local diffusers folder")
    p.add_argument("--solvers", default="all", help=f"comma-separated, 'all' ({', '.join(sorted(SOLVERS))}), or 'deterministic' (all but "
                   f"{', '.join(sorted(s for s in SOLVERS if SOLVERS[s].stochastic))})")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=SOLVER:key=value,...",
                   help="a solver with named options under its own label, run with the solvers (repeatable), e.g. "
                   "v3=dpm_solver_v3:ems=runs/prepared/<hash>/ems.safetensors; the label must name the settings, "
                   "as cells already in the CSV under it are skipped")
    p.add_argument("--nfe", default=lib.DEFAULT_NFE, help="comma-separated NFE values")
    p.add_argument("--grid", default="uniform", choices=GRIDS, help="time grid of the solvers")
    p.add_argument("--final", default="direct", choices=("direct", "clean"),
                   help="direct: the last step goes straight to clean (diffusers); clean: a step from t_min to clean (k-diffusion)")
    p.add_argument("--students", default="", help="comma-separated paths of exported student files")
    p.add_argument("--student-steps", default="1,2,4", help="comma-separated step counts for the students")
    p.add_argument("--allow-other-teacher", action="store_true", help="bench students distilled from another teacher "
                   "(their rows record both teacher hashes)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale of the solvers")
    p.add_argument("--unconditional", action="store_true", help="sample a class-conditional teacher with label -1")
    p.add_argument("--prompts", default=None, help="text-to-image teachers: prompts:<file> (one per line) or "
                   "prompts:hf:<name or folder>; sample i gets the i-th prompt of a seeded order (--seed)")
    p.add_argument("--num-samples", type=int, default=2000, help="samples per cell (mnist16: at most 2,000, the floor's size)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses noise seed (seed + i)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="cpu", help="torch device of the teacher (e.g. cuda)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads (default: distill/core/cores.py)")
    p.add_argument("--out", type=Path, required=True, help="output folder, e.g. results/<name>/")
    p.add_argument("--save-images", action="store_true", help="also write one PNG per sample under images/<cell>/")
    p.add_argument("--reference-dataset", default="mnist16", help="mnist16, or hf:<hub name or local folder>")
    p.add_argument("--reference", default=None, help=f"split of the reference dataset (mnist16: {', '.join(MNIST16_SPLITS)}; "
                   "default reference, training digits 0-1999; hf: default train)")
    p.add_argument("--floor-split", default=None, help="split measured against the reference at the cells' sample count for "
                   "the data floor (mnist16: default floor, the held-out digits then training digits 2000-2999; hf: none unless given)")
    p.add_argument("--train-split", default=None, help="the model's training images: the training-data row and the "
                   "memorization statistics' neighbours (mnist16: default train; hf: none unless given)")
    p.add_argument("--heldout-split", default=None, help="real images no model trained on, the memorization statistics' "
                   "baseline (mnist16: default heldout; hf: none unless given)")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples of each cell's FID spread (0: none)")
    p.add_argument("--cost", default="", help="comma-separated JSON files of the students' training cost, in --students "
                   f"order, for files without a training_cost metadata key (keys: {', '.join(lib.COST_KEYS)}); "
                   "default: <student>.cost.json beside each file when present")
    p.add_argument("--image-column", default="image", help="image column of an hf: reference dataset")
    p.add_argument("--inception-weights", default=None, help="Inception weights (.pth) for RGB teachers; 'download' fetches them")
    p.add_argument("--fid-cache", default="runs/fid_cache", help="folder for cached reference features (named by content)")
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--reference-steps", type=int, default=500, help="RK4 steps of the exact solution (gmm teachers)")
    p.add_argument("--plot-only", action="store_true", help="redraw fid_vs_nfe.png, the table and the sample grids from --out")
    p.add_argument("--plot-with", type=Path, action="append", default=[], metavar="DIR",
                   help="with --plot-only: also draw fid_vs_nfe_with_<DIR name>.png, adding DIR's cells of the same settings")
    return p.parse_args(argv)


def _load_student(path: str):
    """``students.load_student`` (imported on first use), the loader ``lib.load_students`` is given."""
    from students import load_student

    return load_student(path)


student_cost = lib.student_cost  # a student's training cost (tests/test_run_cost.py reads it through this script)


@reports_write_errors  # a full disk or a read-only folder: one sentence, the files before kept
def main(argv=None) -> int:
    args = parse_args(argv)
    with FolderLock(args.out) as lock:  # one writer per --out (distill.engine.lock), released on return or death
        try:
            return _bench(args, argv, lock)
        except FolderInUse as e:  # another bench writes --out: nothing was changed
            print(f"error: {e}", file=sys.stderr)
            return 2


def _bench(args, argv, lock: FolderLock) -> int:
    try:
        configure_threads(args.threads)  # the cores this process may use, or --threads (distill.core.cores)
        lock.acquire_existing()  # an --out written before: locked before its CSV is read; a new one just before writing
        if args.plot_only:
            if (args.out / lib.CSV).is_file():
                lock.acquire()
            lib.redraw(args.out, args.plot_with)
            print(f"redrew {args.out / lib.PNG}")
            return 0
        if args.teacher is None:
            raise ValueError("--teacher is required (unless --plot-only)")
        check_output_dir(args.out, "--out")
        lib.read_teacher_cost(args.out)  # a damaged teacher_cost.json is refused now, not after every cell ran
        lib.check_device(args.device)
        solvers, variants = lib.parse_methods(args.solvers, args.variant)
        nfes = lib.parse_int_list(args.nfe, "--nfe")
        student_paths = [p for p in args.students.split(",") if p]
        student_steps = lib.parse_int_list(args.student_steps, "--student-steps") if student_paths else []
        teacher = load_teacher(args.teacher)
        lib.place_teacher(teacher, args.device)
        cfg = lib.BenchConfig(num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size, grid=args.grid, final=args.final,
                              guidance_scale=args.guidance_scale, unconditional=args.unconditional, save_images=args.save_images,
                              device=args.device, variants=variants, prompts=args.prompts)
        cfg.validate(teacher)
        metric = lib.make_metric(teacher, cfg, reference_dataset=args.reference_dataset, reference=args.reference,
                                 floor_split=args.floor_split, train_split=args.train_split, heldout_split=args.heldout_split,
                                 image_column=args.image_column, inception_weights=args.inception_weights, fid_cache=args.fid_cache,
                                 kid_subset_size=args.kid_subset_size, bootstrap=args.bootstrap, reference_steps=args.reference_steps)
        metric.check(cfg.num_samples)
        students, columns = lib.load_students(student_paths, teacher, _load_student, [p for p in args.cost.split(",") if p],
                                              args.allow_other_teacher)
        lib.check_student_steps(students, student_steps)  # refused now, not after the solver cells ran
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    lock.acquire()
    command = "python scripts/bench.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    lib.benchmark(teacher, cfg, metric, args.out, solvers, nfes, students=students, student_steps=student_steps,
                  student_columns=columns, command=command)
    print(f"wrote {args.out / lib.CSV} and {args.out / lib.PNG}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
