"""Quality of an mnist16 teacher: FID/KID against the training split, the data floor, classifier accuracy.

    python scripts/teacher_quality.py --teacher mnist16 --num-samples 5000 --out results/teachers

Class-conditional samples (labels 0..9 in turn, guidance scale 1) with 50-step DPM-Solver++(2M) by default.
The floor is FID/KID of the held-out split against the training split; the teacher is also measured at the
held-out split's size so the two numbers are comparable. Writes teachers.json, a sample grid, and prints a
markdown table. Progress: tqdm bars on stderr over the network evaluations and the FID/KID sets.
"""

from __future__ import annotations

import os as _os
import sys as _sys

# scripts/distill.py is named like the ``distill`` package: keep this folder off the import path.
if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from distill.core.atomic import reports_write_errors, write_text
from distill.data import load_dataset
from distill.eval.fid import fid_kid, load_classifier
from distill.eval.plots import save_image_grid
from distill.solvers import sample
from teachers import load_teacher


def generate(teacher, n: int, solver: str, nfe: int, seed: int, batch: int = 500, uncond: bool = False,
             progress: bool = False):
    """``n`` samples (labels 0..9 in turn, or unconditional) and their labels; ``progress``: a tqdm bar over the network
    evaluations of all batches."""
    labels = torch.arange(n) % 10
    out = []
    starts = range(0, n, batch)
    desc = f"{'unconditional' if uncond else 'conditional'} samples"
    with torch.inference_mode(), tqdm(total=len(starts) * nfe, desc=desc, unit="NFE", disable=not progress) as bar:
        for i in starts:
            seeds = range(seed + i, seed + min(i + batch, n))
            noise = torch.stack([torch.randn(teacher.data_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
            cond = torch.full((len(noise),), -1) if uncond else labels[i:i + len(noise)]
            out.append(sample(teacher, noise, solver=solver, nfe=nfe, cond=cond, nfe_bar=bar))
    return torch.cat(out), labels


@reports_write_errors  # a full disk or a read-only folder: one sentence, the files before kept
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="mnist16")
    p.add_argument("--solver", default="dpmpp_2m")
    p.add_argument("--nfe", type=int, default=50)
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/teachers"))
    args = p.parse_args(argv)
    teacher = load_teacher(args.teacher)
    train, held = load_dataset("mnist16", "train").x, load_dataset("mnist16", "heldout")
    t0 = time.time()
    x, labels = generate(teacher, args.num_samples, args.solver, args.nfe, args.seed, progress=True)
    xu, _ = generate(teacher, len(held), args.solver, args.nfe, args.seed + 1_000_000, uncond=True, progress=True)
    seconds = time.time() - t0
    with torch.no_grad():
        accuracy = float((load_classifier()(x.float()).argmax(1) == labels).float().mean())
    n_small = len(held)
    sets = {f"cond_{args.num_samples}": x, f"cond_{n_small}": x[:n_small], f"uncond_{n_small}": xu,
            f"floor_heldout_{n_small}": held.x}
    res = {
        "teacher": args.teacher, "teacher_hash": teacher.hash, "solver": args.solver, "nfe": args.nfe, "seed": args.seed,
        **{name: fid_kid(samples, train) for name, samples in tqdm(sets.items(), desc="FID/KID", unit="set")},
        "class_accuracy": accuracy, "sampling_seconds": round(seconds, 1),
        "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads",
        "command": "python scripts/teacher_quality.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "teachers.json", json.dumps(res, indent=1) + "\n")  # atomic (distill.core.atomic)
    order = torch.cat([torch.nonzero(labels == k).flatten()[:10] for k in range(10)])
    save_image_grid(x[order], args.out / "mnist16_teacher_samples.png", title=f"{args.solver}, {args.nfe} NFE, one row per class")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
