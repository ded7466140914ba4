"""FID vs NFE of training-free solvers and distilled students on one teacher (exact metrics for gmm:* teachers).

    python scripts/bench.py --teacher mnist16 --solvers euler,heun,dpmpp_2m,unipc --nfe 1,2,3,4,5,6,8,10,20 \\
        --students s.safetensors --student-steps 1,2,4 --num-samples 2000 --seed 0 --out results/mnist16
    python scripts/bench.py --teacher gmm:ring8 --solvers all --nfe 3,5,10,20 --num-samples 1000 --out results/gmm
    python scripts/bench.py --plot-only --out results/mnist16
    python scripts/bench.py --teacher mnist16 --solvers "" --variant v3=dpm_solver_v3:ems=runs/prepared/<hash>/ems.safetensors \
        --nfe 2,3,4,5 --num-samples 2000 --out results/mnist16_fast

Writes fid_vs_nfe.csv (a row per method and NFE, plus the data floor and the training data at the same sample
count and reference), fid_vs_nfe.png, fid_vs_nfe.md (the table), fid_vs_cost.png (when students record their
training cost) and samples/<method>.png.
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

from distill.data import MNIST16_SPLITS, load_dataset
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
    p.add_argument("--prompts", default=None, help="text-to-image teachers: prompts:<file> (one per line) or "
                   "prompts:hf:<name or folder>; sample i gets the i-th prompt of a seeded order (--seed)")
    p.add_argument("--num-samples", type=int, default=2000, help="samples per cell (mnist16: at most 2,000, the floor's size)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses noise seed (seed + i)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="cpu", help="torch device of the teacher (e.g. cuda)")
    p.add_argument("--out", type=Path, required=True, help="output folder, e.g. results/<name>/")
    p.add_argument("--save-images", action="store_true", help="also write one PNG per sample under images/<cell>/")
    p.add_argument("--reference-dataset", default="mnist16", help="mnist16, or hf:<hub name or local image folder>")
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
    p.add_argument("--inception-weights", default=None, help="torch-fidelity Inception weights (.pth) for RGB teachers; "
                   "'download' lets torch-fidelity fetch them")
    p.add_argument("--fid-cache", default="runs/fid_cache", help="folder for cached reference features (named by content)")
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--reference-steps", type=int, default=500, help="RK4 steps of the exact solution (gmm teachers)")
    p.add_argument("--plot-only", action="store_true", help="redraw fid_vs_nfe.png, the table and the sample grids from --out")
    p.add_argument("--plot-with", type=Path, action="append", default=[], metavar="DIR",
                   help="with --plot-only: also draw fid_vs_nfe_with_<DIR name>.png, adding DIR's cells of the same settings")
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
    extractor, weights, splits = EXTRACTOR, None, data_splits(args)
    shape = getattr(teacher, "image_shape", teacher.data_shape)  # a latent teacher is measured on decoded images
    if args.reference_dataset == "mnist16":
        if shape[0] != 1:
            raise ValueError(f"teacher {teacher.name!r} makes {shape[0]}-channel images: measure it with "
                             "torch-fidelity's Inception, giving --reference-dataset hf:<name or folder> and --inception-weights PATH")
        for split in splits.values():
            if split is not None and split not in MNIST16_SPLITS:
                raise ValueError(f"unknown mnist16 split {split!r}; allowed: {', '.join(MNIST16_SPLITS)}")
    elif args.reference_dataset.startswith("hf:"):
        extractor = INCEPTION
        if args.inception_weights is None:
            raise ValueError("FID with torch-fidelity's Inception needs --inception-weights PATH (a local .pth of its "
                             "weights, as nothing is downloaded by default) or --inception-weights download")
        if args.inception_weights != "download":
            if not Path(args.inception_weights).is_file():
                raise FileNotFoundError(f"no Inception weights file at {args.inception_weights!r} (--inception-weights)")
            weights = args.inception_weights
    else:
        raise ValueError(f"unknown --reference-dataset {args.reference_dataset!r}; allowed: mnist16, hf:<name or folder>")
    sets = {k: None if v is None else reference_set(args.reference_dataset, v, args.image_column, shape)
            for k, v in splits.items()}
    return lib.FidMetric(sets["reference"], extractor=extractor, weights_path=weights, cache_root=args.fid_cache,
                         kid_subset_size=args.kid_subset_size, bootstrap=args.bootstrap, floor_set=sets["floor"],
                         floor_name=f"{splits['floor']} vs {splits['reference']}", train_set=sets["train"], heldout_set=sets["heldout"])


def data_splits(args) -> dict[str, str | None]:
    """The splits of the reference, the floor, the training data and the held-out data (mnist16 defaults: the
    benchmark's own three-way split of distill.data)."""
    mnist = args.reference_dataset == "mnist16"
    return {"reference": args.reference or ("reference" if mnist else "train"),
            "floor": args.floor_split or ("floor" if mnist else None),
            "train": args.train_split or ("train" if mnist else None),
            "heldout": args.heldout_split or ("heldout" if mnist else None)}


def student_cost(path: str, cost_file: str | None) -> dict:
    """A student's training cost: the file's own ``training_cost`` metadata (a JSON object), else ``cost_file``,
    else ``<student>.cost.json`` beside it, else nothing. Keys: ``lib.COST_KEYS``; others are refused."""
    import json

    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        text = (f.metadata() or {}).get("training_cost")
    source = f"the training_cost metadata of {path}"
    if text is None:
        sidecar = Path(path).with_suffix(".cost.json")
        cost_path = Path(cost_file) if cost_file else sidecar if sidecar.is_file() else None
        if cost_path is None:
            return {}
        if not cost_path.is_file():
            raise FileNotFoundError(f"no cost file at {cost_path} (--cost)")
        text, source = cost_path.read_text(), str(cost_path)
    cost = json.loads(text)
    unknown = sorted(set(cost) - set(lib.COST_KEYS)) if isinstance(cost, dict) else ["(not a JSON object)"]
    if unknown:
        raise ValueError(f"{source} has unknown cost keys {unknown}; allowed: {', '.join(lib.COST_KEYS)}")
    return cost


def load_students(paths: list[str], teacher, cost_files: list[str] = (), allow_other_teacher: bool = False) -> tuple[dict, dict]:
    """{name: student} through ``students.load_student`` (name: the file's stem, or its path when stems clash), and
    {name: extra CSV columns}: the file's path and its training cost (``student_cost``)."""
    if not paths:
        return {}, {}
    if cost_files and len(cost_files) != len(paths):
        raise ValueError(f"--cost names {len(cost_files)} files for {len(paths)} students; allowed: one per student, in order")
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
    for (name, student), path in zip(loaded.items(), paths):
        lib.check_student(teacher, name, student, allow_other_teacher, near=Path(path).parent)
    costs = [student_cost(p, c) for p, c in zip(paths, cost_files or [None] * len(paths))]
    columns = {name: {"student_path": p, **{f"cost_{k}": v for k, v in cost.items()}} for name, p, cost in zip(names, paths, costs)}
    return loaded, columns


def redraw(out: Path, plot_with: list[Path] = ()) -> None:
    import json

    rows = lib.read_bench_rows(out / lib.CSV)
    if not any(r["kind"] not in lib.DATA_KINDS for r in rows):
        raise FileNotFoundError(f"no benchmark cells in {out / lib.CSV}")
    if plot_with:  # one more picture with the cells of other folders of the same settings (e.g. the classic solvers)
        others = []
        for folder in plot_with:
            if not (folder / lib.CSV).is_file():
                raise FileNotFoundError(f"no {lib.CSV} in {folder} (--plot-with)")
            others += [r for r in lib.read_bench_rows(folder / lib.CSV) if r["kind"] not in lib.DATA_KINDS]
        lib.plot_bench(others + rows, out / lib.PNG.replace(".png", "_with_" + "_".join(f.name for f in plot_with) + ".png"))
    lib.plot_bench(rows, out / lib.PNG)
    teacher_cost = json.loads((out / lib.TEACHER_COST).read_text()) if (out / lib.TEACHER_COST).is_file() else None
    lib.plot_cost(rows, out / lib.COST_PNG, teacher_cost)
    (out / lib.TABLE).write_text(lib.markdown_table(rows))
    lib.save_method_grids(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.plot_only:
            redraw(args.out, args.plot_with)
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
                          device=args.device, variants=variants, prompts=args.prompts)
        cfg.validate(teacher)
        metric = make_metric(teacher, cfg, args)
        metric.check(cfg.num_samples)
        students, columns = load_students(student_paths, teacher, [p for p in args.cost.split(",") if p],
                                          args.allow_other_teacher)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    cells = lib.plan_cells(solvers, nfes, list(students), student_steps, variants=variants)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "commands.txt", "a") as f:
        f.write("python scripts/bench.py " + shlex.join(argv if argv is not None else sys.argv[1:]) + "\n")
    lib.run_bench(teacher, cells, cfg, metric, args.out, students=students, student_columns=columns)
    redraw(args.out)
    print(f"wrote {args.out / lib.CSV} and {args.out / lib.PNG}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
