"""The cells of a benchmark (one method at one NFE): planning them, drawing their samples from the shared per-sample
noise, and keeping those samples (the picture of each method, and one PNG per sample for external FID tools)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from distill.core.atomic import write_folder, write_with
from distill.eval.bench.config import GRID_SAMPLES, BenchConfig, cond_for, is_analytic
from distill.eval.bench.student import student_sample
from distill.eval.fid import uint8_images
from distill.solvers import get_solver, per_sample_noises, sample


@dataclass(frozen=True)
class Cell:
    method: str  # solver name, or student name
    kind: str  # "solver" or "student"
    nfe: int
    steps: int

    @property
    def name(self) -> str:
        """A file name for this cell."""
        return f"{method_stem(self.kind, self.method)}_nfe{self.nfe}"


def method_stem(kind: str, method: str) -> str:
    """A file name for a method: its kind and its name with unsafe characters replaced."""
    return f"{kind}-{re.sub(r'[^A-Za-z0-9._-]', '_', method)}"


def plan_cells(solvers: list[str], nfes: list[int], students: list[str] = (), student_steps: list[int] = (),
               log: Callable[[str], None] = print, variants: dict | None = None) -> list[Cell]:
    """Every (solver, NFE) the solver can spend exactly (others skipped with a note), then every (student, steps).
    A k-step student spends k NFE. ``variants`` (label -> (solver, options)) are cells under their label."""
    cells, variants = [], variants or {}
    for s in solvers:
        for n in nfes:
            try:
                cells.append(Cell(s, "solver", n, get_solver(variants.get(s, (s,))[0]).steps_for_nfe(n, True)))
            except ValueError as e:
                log(f"note: cell skipped: {e}")
    return cells + [Cell(name, "student", k, k) for name in students for k in student_steps]


def generate(teacher, cell: Cell, cfg: BenchConfig, student=None) -> tuple[torch.Tensor, float]:
    """The ``cfg.num_samples`` samples of one cell (on the CPU) and the wall seconds spent sampling them."""
    dtype = torch.float64 if is_analytic(teacher) else torch.float32
    solver, variant_options = cfg.variants.get(cell.method, (cell.method, {}))
    stochastic = cell.kind == "solver" and get_solver(solver).stochastic
    out, seconds = [], 0.0
    starts = range(0, cfg.num_samples, cfg.batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc=f"{cell.method} NFE {cell.nfe}", unit="batch", leave=False, disable=len(starts) < 2):
            stop = min(start + cfg.batch_size, cfg.num_samples)
            seeds = range(cfg.seed + start, cfg.seed + stop)
            noise, step_noises = per_sample_noises(teacher.data_shape, seeds, cell.steps if stochastic else 0, dtype)
            noise = noise.to(cfg.device)
            cond = cond_for(teacher, cfg, start, stop)
            cond = None if cond is None else cond.to(cfg.device)
            options = {"noises": [z.to(cfg.device) for z in step_noises]} if stochastic else {}
            t0 = time.perf_counter()
            if cell.kind == "solver":
                kwargs = {"grid": cfg.grid, "final": cfg.final, "guidance_scale": cfg.guidance_scale, **variant_options}
                x = sample(teacher, noise, solver=solver, nfe=cell.nfe, cond=cond, **kwargs, **options)
            else:
                x = student_sample(student, noise, cell.steps, cond, seed=cfg.seed + start, guidance_scale=cfg.guidance_scale)
            if x.is_cuda:
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
            if hasattr(teacher, "decode"):  # a latent teacher: measure images, not latents (decoding is not timed)
                x = teacher.decode(x)
            out.append(x.cpu())
    return torch.cat(out), seconds


def save_png_folder(x: torch.Tensor, folder: Path) -> None:
    """One PNG per sample (000000.png, ...), for external FID tools; written to a temp folder, then renamed
    (``distill.core.atomic``)."""
    from PIL import Image

    u8 = uint8_images(torch.nan_to_num(x.float()))
    u8 = u8[:, :1] if x.shape[1] == 1 else u8

    def fill(tmp: Path) -> None:
        for i, img in enumerate(u8.permute(0, 2, 3, 1).numpy()):
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(tmp / f"{i:06d}.png")

    write_folder(folder, fill)


def save_cell_samples(x: torch.Tensor, cell: Cell, out: Path) -> None:
    """The first GRID_SAMPLES samples of a cell, for the method's picture."""
    from safetensors.torch import save_file

    (out / "samples").mkdir(parents=True, exist_ok=True)
    meta = {"method": cell.method, "kind": cell.kind, "nfe": str(cell.nfe)}
    tensors = {"samples": x[:GRID_SAMPLES].float().contiguous()}
    write_with(out / "samples" / f"{cell.name}.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata=meta))
