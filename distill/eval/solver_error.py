"""Exact solver benchmark on analytic teachers: error against the exact ODE solution, distance to data.

For each (teacher, solver, NFE) cell, every solver starts from the same per-sample noise. Metrics:
  * ``ode_rmse``: RMSE against the exact answer to the same sampling problem: the probability-flow ODE
    solved to t_min in float64 (``ode_reference``), then denoised, as every solver's last step does;
  * ``swd``: sliced Wasserstein distance to as many exact data samples;
  * ``nll``: mean negative log-likelihood of the samples under the exact data density.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from distill.core.atomic import csv_text, write_text
from distill.core.denoisers import classifier_free_guidance
from distill.eval.exact import ode_reference, rmse, sliced_wasserstein
from distill.solvers import get_solver, per_sample_noise, sample

FIELDS = ["teacher", "schedule", "solver", "grid", "nfe", "steps", "ode_rmse", "swd", "swd_floor", "nll", "nll_floor",
          "num_samples", "seed", "seconds"]


@dataclass
class Problem:
    """Everything a cell needs that does not depend on the solver: noise, labels, reference, data."""

    teacher: object
    noise: torch.Tensor
    reference: torch.Tensor
    data: torch.Tensor
    swd_floor: float
    nll_floor: float
    seed: int
    cond: torch.Tensor | None = None  # class labels (component k; -1: the whole mixture), None: unconditional
    guidance_scale: float | None = None


def make_problem(teacher, num_samples: int, seed: int = 0, reference_steps: int = 500, *, cond: torch.Tensor | None = None,
                 guidance_scale: float | None = None) -> Problem:
    """Sample i starts from noise seed (seed + i); the reference solves the same (guided) ODE in float64;
    the data (and the floors: exact samples against exact samples) follow the same labels."""
    s = teacher.schedule
    noise = per_sample_noise(teacher.data_shape, range(seed, seed + num_samples), torch.float64)
    denoiser = teacher.denoise if guidance_scale is None else classifier_free_guidance(teacher.denoise, guidance_scale)
    x_T = noise * float(s.init_noise_scale(s.t_max))
    x_min = ode_reference(denoiser, x_T, s.t_max, s.t_min, s, cond=cond, steps=reference_steps)
    reference = denoiser(x_min, torch.full((num_samples,), float(s.t_min), dtype=torch.float64), cond)
    g = torch.Generator().manual_seed(10_000 + seed)
    data = teacher.sample_data(num_samples, generator=g, cond=cond)
    data2 = teacher.sample_data(num_samples, generator=g, cond=cond)
    return Problem(teacher, noise, reference, data, sliced_wasserstein(data2, data), float(-teacher.log_prob(data2, cond=cond).mean()),
                   seed, cond, guidance_scale)


def exact_metrics(problem: Problem, x: torch.Tensor) -> dict:
    """RMSE against the exact ODE solution, sliced W2 to exact data, NLL under the exact (class) density."""
    return {"ode_rmse": rmse(x, problem.reference), "swd": sliced_wasserstein(x, problem.data),
            "nll": float(-problem.teacher.log_prob(x, cond=problem.cond).mean())}


def run_cell(problem: Problem, solver: str, nfe: int, grid: str = "logsnr") -> dict:
    t0 = time.perf_counter()
    x, info = sample(problem.teacher, problem.noise, solver=solver, nfe=nfe, grid=grid, cond=problem.cond,
                     guidance_scale=problem.guidance_scale, return_info=True)
    seconds = time.perf_counter() - t0
    return {
        "teacher": problem.teacher.name, "schedule": problem.teacher.schedule.kind, "solver": solver, "grid": grid,
        "nfe": info["nfe"], "steps": len(info["ts"]) - 1, **exact_metrics(problem, x), "swd_floor": problem.swd_floor,
        "nll_floor": problem.nll_floor, "num_samples": len(x), "seed": problem.seed, "seconds": seconds,
    }


def fits(solver: str, nfe: int) -> bool:
    try:
        get_solver(solver).steps_for_nfe(nfe, True)
        return True
    except ValueError:
        return False


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: Iterable[dict], fields: list[str] = FIELDS) -> None:
    """Write the CSV atomically (temp file + rename, ``distill.core.atomic``), so an interrupted run never leaves half a
    file."""
    rows = [{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows]
    write_text(path, csv_text(rows, fields))


def plot(rows: list[dict], path: Path) -> None:
    """ODE error and sliced Wasserstein vs NFE (log-log), one panel pair per teacher, one line per solver."""
    from distill.eval.plots import plt, save_figure

    teachers = list(dict.fromkeys(r["teacher"] for r in rows))
    fig, axes = plt.subplots(len(teachers), 2, figsize=(11, 4 * len(teachers)), squeeze=False)
    for row_axes, teacher in zip(axes, teachers):
        mine = [r for r in rows if r["teacher"] == teacher]
        for solver in dict.fromkeys(r["solver"] for r in mine):
            pts = sorted((int(r["nfe"]), float(r["ode_rmse"]), float(r["swd"])) for r in mine if r["solver"] == solver)
            nfe, err, swd = zip(*pts)
            row_axes[0].plot(nfe, err, "o-", ms=3, label=solver)
            row_axes[1].plot(nfe, swd, "o-", ms=3, label=solver)
        row_axes[1].axhline(float(mine[0]["swd_floor"]), color="k", ls="--", lw=1, label="exact samples")
        ticks = sorted({int(r["nfe"]) for r in mine})
        for ax, name in zip(row_axes, ["RMSE vs exact ODE solution", "sliced W2 to data"]):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(ticks, [str(n) for n in ticks])
            ax.minorticks_off()
            ax.set_xlabel("NFE")
            ax.set_title(f"{teacher} ({mine[0]['schedule']}): {name}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        row_axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)
    plt.close(fig)
