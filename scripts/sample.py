"""Sample a teacher with a training-free solver; write samples.safetensors and a picture.

    python scripts/sample.py --teacher gmm:ring8 --solver dpmpp_2m --nfe 10 --n 512 --seed 0 --out runs/ring8
    python scripts/sample.py --teacher /models/sd15 --prompt "a red fox" --guidance-scale 7.5 --solver dpmpp_2m --nfe 8 \
        --n 16 --out runs/fox      # text-to-image: latents in samples.safetensors, VAE-decoded images beside them

Progress: a tqdm bar on stderr over the network evaluations of all batches.
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
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from distill.core.atomic import reports_write_errors, write_text, write_with
from distill.core.conditioning import takes_prompts
from distill.core.grids import FINALS, GRIDS
from distill.engine.paths import check_output_dir
from distill.eval.plots import save_image_grid, save_scatter_2d
from distill.solvers import SOLVERS, per_sample_noise, sample
from teachers import load_teacher


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="gmm:<preset>[@schedule] or a local diffusers folder")
    p.add_argument("--solver", required=True, help=f"one of: {', '.join(sorted(SOLVERS))}")
    p.add_argument("--nfe", type=int, required=True, help="network evaluations per sample")
    p.add_argument("--grid", default="logsnr", choices=GRIDS)
    p.add_argument("--final", default="clean", choices=FINALS, help="how the grid ends (see distill.core.grids)")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="sample i uses noise seed (seed + i)")
    p.add_argument("--class-label", type=int, default=None, help="class for a class-conditional teacher (-1: unconditional)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale (1 = conditional)")
    p.add_argument("--prompt", default=None, help="text-to-image teachers: the prompt of every sample")
    p.add_argument("--negative-prompt", default=None, help="text-to-image teachers: the unconditional branch of CFG "
                   "(default: the empty prompt)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", required=True, type=Path, help="output folder")
    return p.parse_args(argv)


OUTPUT_FILES = ("samples.safetensors", "samples.png", "sample_args.json")


def guidance_problem(args, teacher) -> str | None:
    """Why --guidance-scale cannot act with this teacher and label (it would be a silent no-op or fail late)."""
    prompted = takes_prompts(teacher)
    if prompted and args.class_label is not None:
        return (f"--class-label is for class-conditional teachers; teacher {teacher.name!r} is text-conditioned: drop "
                f"--class-label and give --prompt TEXT")
    if prompted != (args.prompt is not None):
        return ("--prompt is for text-to-image teachers; this teacher takes --class-label" if args.prompt is not None
                else f"teacher {teacher.name!r} is text-conditioned: give --prompt TEXT")
    if args.guidance_scale is None or prompted:
        return None
    if args.class_label is None:
        return "--guidance-scale needs --class-label"
    if not teacher.num_classes:
        return f"--guidance-scale needs a class-conditional teacher; {teacher.name!r} is unconditional (drop --guidance-scale)"
    if not teacher.has_uncond:
        return (f"--guidance-scale needs a teacher with an unconditional mode; {teacher.name!r} is class-conditional "
                f"without one (drop --guidance-scale)")
    if args.class_label == -1:
        return (f"--guidance-scale with --class-label -1 (unconditional) changes nothing: guidance pushes the unconditional "
                f"model towards a class, so give --class-label 0..{teacher.num_classes - 1} or drop --guidance-scale")
    return None


@reports_write_errors  # a full disk or a read-only folder: one sentence, the files before kept
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.solver not in SOLVERS:
        sys.exit(f"error: unknown solver {args.solver!r}; valid solvers: {', '.join(sorted(SOLVERS))}")
    if args.n < 1 or args.nfe < 1 or args.batch_size < 1:
        sys.exit(f"error: --n, --nfe and --batch-size must be at least 1, got {args.n}, {args.nfe} and {args.batch_size}")
    try:
        check_output_dir(args.out, "--out", files=OUTPUT_FILES)
        teacher = load_teacher(args.teacher)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    problem = guidance_problem(args, teacher)
    if problem:
        sys.exit(f"error: {problem}")
    dtype = torch.float64 if args.teacher.startswith("gmm:") else torch.float32
    seeds = list(range(args.seed, args.seed + args.n))
    out = []
    starts = range(0, args.n, args.batch_size)
    with torch.inference_mode(), tqdm(total=len(starts) * args.nfe, desc=f"{args.solver} NFE {args.nfe}", unit="NFE") as bar:
        for i in starts:
            noise = per_sample_noise(teacher.data_shape, seeds[i:i + args.batch_size], dtype)
            cond = None if args.class_label is None else torch.full((len(noise),), args.class_label, dtype=torch.long)
            if args.prompt is not None:
                cond = teacher.encode_prompts([args.prompt] * len(noise), args.negative_prompt)
            try:
                out.append(sample(teacher, noise, solver=args.solver, nfe=args.nfe, grid=args.grid, final=args.final, cond=cond,
                                  guidance_scale=args.guidance_scale, nfe_bar=bar))
            except ValueError as e:
                sys.exit(f"error: {e}")
    x = torch.cat(out)
    images = torch.cat([teacher.decode(x[i:i + args.batch_size]) for i in range(0, len(x), args.batch_size)]) \
        if hasattr(teacher, "decode") else None  # a latent teacher: its VAE's pictures of the latents
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"teacher": args.teacher, "teacher_hash": teacher.hash, "solver": args.solver, "nfe": str(args.nfe),
            "grid": args.grid, "final": args.final, "seeds": f"{args.seed}..{args.seed + args.n - 1}", "class_label": str(args.class_label),
            "guidance_scale": str(args.guidance_scale), "prompt": str(args.prompt),
            "negative_prompt": str(args.negative_prompt)}
    tensors = {"samples": x.contiguous(), **({} if images is None else {"images": images.contiguous()})}
    write_with(args.out / "samples.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata=meta))  # atomic
    title = f"{args.teacher} {args.solver} NFE={args.nfe}"
    if len(teacher.data_shape) == 3:
        save_image_grid((x if images is None else images)[:64], args.out / "samples.png", title=title)
    elif teacher.data_shape == (2,):
        log_density = teacher.log_prob if hasattr(teacher, "log_prob") else None
        save_scatter_2d(x, args.out / "samples.png", log_density=log_density, title=title)
    write_text(args.out / "sample_args.json", json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))
    print(f"wrote {len(x)} samples to {args.out / 'samples.safetensors'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
