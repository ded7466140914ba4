"""FID vs NFE of training-free solvers and distilled students on one teacher (exact metrics for gmm:* teachers).

    python scripts/bench.py --teacher mnist16 --solvers euler,heun,dpmpp_2m,unipc --nfe 1,2,3,4,5,6,8,10,15,20,50 \\
        --num-samples 5000 --seed 0 --out results/mnist16
    python scripts/bench.py --teacher gmm:ring8 --solvers all --nfe 3,5,10,20 --num-samples 1000 --out results/gmm
    python scripts/bench.py --plot-only --out results/mnist16
    python scripts/bench.py --teacher mnist16 --solvers "" --variant v3=dpm_solver_v3:ems=runs/prepared/<hash>/ems.safetensors \
        --nfe 2,3,4,5 --num-samples 2000 --out results/mnist16_fast

Writes fid_vs_nfe.csv (a row per method and NFE, plus the data floor), fid_vs_nfe.png, fid_vs_nfe.md (the
table) and samples/<method>.png.
Resumable: cells already in the CSV with the same settings are skipped. Sample i uses noise seed (seed + i) in
every cell; class labels cycle 0..K-1 (--unconditional: -1). Solvers that cannot spend an NFE exactly are skipped.
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

import torch

from distill.data import SPLITS, load_dataset
from distill.eval import bench as lib
from distill.eval.fid import EXTRACTOR, INCEPTION
from distill.grids import GRIDS
from distill.paths import check_output_dir
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
    p.add_argument("--num-samples", type=int, default=5000, help="samples per cell")
    p.add_argument("--seed", type=int, default=0, help="sample i uses noise seed (seed + i)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="cpu", help="torch device of the teacher (e.g. cuda)")
    p.add_argument("--out", type=Path, required=True, help="output folder, e.g. results/<name>/")
    p.add_argument("--save-images", action="store_true", help="also write one PNG per sample under images/<cell>/")
    p.add_argument("--reference-dataset", default="mnist16", help="mnist16, or hf:<hub name or local image folder>")
    p.add_argument("--reference", default="train", help=f"split of the reference dataset ({', '.join(SPLITS)} for mnist16)")
    p.add_argument("--floor-split", default=None, help="split measured against the reference for the data floor "
                   "(mnist16: the other split; hf: none unless given)")
    p.add_argument("--image-column", default="image", help="image column of an hf: reference dataset")
    p.add_argument("--inception-weights", default=None, help="torch-fidelity Inception weights (.pth) for RGB teachers; "
                   "'download' lets torch-fidelity fetch them")
    p.add_argument("--fid-cache", default="runs/fid_cache", help="folder for cached reference statistics")
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--reference-steps", type=int, default=500, help="RK4 steps of the exact solution (gmm teachers)")
    p.add_argument("--plot-only", action="store_true", help="redraw fid_vs_nfe.png, the table and the sample grids from --out")
    return p.parse_args(argv)


def reference_set(name: str, split: str, image_column: str, data_shape) -> torch.Tensor:
    """All images of a dataset split as one tensor in [-1, 1] at the teacher's resolution."""
    if name == "mnist16":
        return load_dataset("mnist16", split).x
    channels, resolution = data_shape[0], data_shape[-1]
    ds = load_dataset(name, split, image_column=image_column, resolution=resolution, channels=channels)
    return torch.stack([ds[i][0] for i in range(len(ds))])


def make_metric(teacher, cfg: lib.BenchConfig, args):
    """ExactMetric for analytic teachers; FidMetric (mnist16 classifier, or Inception for other datasets) for images."""
    if lib.is_analytic(teacher):
        return lib.ExactMetric(teacher, cfg, args.reference_steps)
    if not lib.is_image(teacher):
        raise ValueError(f"the bench measures image teachers (FID) and analytic gmm:* teachers (exact metrics); "
                         f"{teacher.name!r} makes data of shape {teacher.data_shape}")
    extractor, weights = EXTRACTOR, None
    if args.reference_dataset == "mnist16":
        if teacher.data_shape[0] != 1:
            raise ValueError(f"teacher {teacher.name!r} makes {teacher.data_shape[0]}-channel images: measure it with "
                             "torch-fidelity's Inception, giving --reference-dataset hf:<name or folder> and --inception-weights PATH")
        if args.reference not in SPLITS:
            raise ValueError(f"unknown mnist16 split {args.reference!r}; allowed: {', '.join(SPLITS)}")
        floor_split = args.floor_split or next(s for s in SPLITS if s != args.reference)
    elif args.reference_dataset.startswith("hf:"):
        extractor, floor_split = INCEPTION, args.floor_split
        if args.inception_weights is None:
            raise ValueError("FID with torch-fidelity's Inception needs --inception-weights PATH (a local .pth of its "
                             "weights, as nothing is downloaded by default) or --inception-weights download")
        if args.inception_weights != "download":
            if not Path(args.inception_weights).is_file():
                raise FileNotFoundError(f"no Inception weights file at {args.inception_weights!r} (--inception-weights)")
            weights = args.inception_weights
    else:
        raise ValueError(f"unknown --reference-dataset {args.reference_dataset!r}; allowed: mnist16, hf:<name or folder>")
    reference = reference_set(args.reference_dataset, args.reference, args.image_column, teacher.data_shape)
    floor = None if floor_split is None else reference_set(args.reference_dataset, floor_split, args.image_column, teacher.data_shape)
    return lib.FidMetric(reference, extractor=extractor, weights_path=weights, cache_root=args.fid_cache,
                     kid_subset_size=args.kid_subset_size, floor_set=floor, floor_name=f"{floor_split} vs {args.reference}")


def load_students(paths: list[str], teacher, allow_other_teacher: bool = False) -> dict:
    """{name: student} through ``students.load_student`` (name: the file's stem, or its path when stems clash)."""
    if not paths:
        return {}
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"no student file at {', '.join(missing)}")
    try:
        from students import load_student
    except ImportError:
        raise ValueError("--students needs students.load_student, which this checkout does not have yet") from None
    stems = [Path(p).stem for p in paths]
    names = [s if stems.count(s) == 1 else p for s, p in zip(stems, paths)]
    loaded = {name: load_student(path) for name, path in zip(names, paths)}
    for name, student in loaded.items():
        lib.check_student(teacher, name, student, allow_other_teacher)
    return loaded


def redraw(out: Path) -> None:
    rows = lib.read_bench_rows(out / lib.CSV)
    if not any(r["kind"] != "floor" for r in rows):
        raise FileNotFoundError(f"no benchmark cells in {out / lib.CSV}")
    lib.plot_bench(rows, out / lib.PNG)
    (out / lib.TABLE).write_text(lib.markdown_table(rows))
    lib.save_method_grids(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.plot_only:
            redraw(args.out)
            print(f"redrew {args.out / lib.PNG}")
            return 0
        if args.teacher is None:
            raise ValueError("--teacher is required (unless --plot-only)")
        check_output_dir(args.out, "--out")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device} needs a GPU, but torch sees none; use --device cpu")
        solvers = lib.parse_solvers(args.solvers)
        variants = {label: (solver, opts) for label, solver, opts in map(lib.parse_variant, args.variant)}
        solvers += [v for v in variants if v not in solvers]
        nfes = lib.parse_int_list(args.nfe, "--nfe")
        student_paths = [p for p in args.students.split(",") if p]
        student_steps = lib.parse_int_list(args.student_steps, "--student-steps") if student_paths else []
        teacher = load_teacher(args.teacher)
        if not lib.is_analytic(teacher) and hasattr(teacher, "to"):
            teacher.to(args.device)
        cfg = lib.BenchConfig(num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size, grid=args.grid, final=args.final,
                          guidance_scale=args.guidance_scale, unconditional=args.unconditional, save_images=args.save_images,
                          device=args.device, variants=variants)
        cfg.validate(teacher)
        metric = make_metric(teacher, cfg, args)
        students = load_students(student_paths, teacher, args.allow_other_teacher)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    cells = lib.plan_cells(solvers, nfes, list(students), student_steps, variants=variants)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "commands.txt", "a") as f:
        f.write("python scripts/bench.py " + shlex.join(argv if argv is not None else sys.argv[1:]) + "\n")
    lib.run_bench(teacher, cells, cfg, metric, args.out, students=students)
    redraw(args.out)
    print(f"wrote {args.out / lib.CSV} and {args.out / lib.PNG}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
