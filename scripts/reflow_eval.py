"""Straightness and exact k-step metrics of an analytic teacher and of students distilled from it (reflow rounds,
one-step distillations, progressive rounds), all from the same per-sample noise.

    python scripts/reflow_eval.py --teacher gmm:ring8@rectified_flow --models teacher 1-RF=runs/r1/student.safetensors \
        --steps 1 2 4 --num-samples 2000 --out results/gmm/reflow

Per model: ``straightness`` of its own ODE (``distill.eval.straightness``; the teacher's is the exact denoiser's),
and per step count (students: DDIM on their own grid, ``student.sample``; the teacher: k DDIM steps on the
``--teacher-grid`` spacing, default uniform, the last step onto clean data, as a student's k-step grid is):
``ode_rmse`` against the teacher's exact ODE solution from the same noise, ``self_rmse`` against the model's own
ODE endpoint (0 for straight paths), ``swd`` to exact data, ``nll`` under the exact density. With ``own`` among
``--steps`` the students take only their recorded step counts and the teacher the listed integers (``--steps own 1 2
4 8 16``: progressive rounds against DDIM at the same NFE). Writes <out>.csv and <out>.md. Progress: a tqdm bar on
stderr over the evaluations.
"""

from __future__ import annotations

import os as _os
import sys as _sys

if _sys.path and _os.path.abspath(_sys.path[0]) == _os.path.dirname(_os.path.abspath(__file__)):
    _sys.path.pop(0)

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from distill.core.atomic import csv_text, reports_write_errors, write_text  # noqa: E402
from distill.core.grids import GRIDS  # noqa: E402
from distill.eval.exact import rmse, sliced_wasserstein  # noqa: E402
from distill.eval.solver_error import make_problem  # noqa: E402
from distill.eval.straightness import ode_path, straightness  # noqa: E402
from distill.solvers import sample  # noqa: E402
from teachers import load_teacher  # noqa: E402

FIELDS = ["model", "steps", "straightness", "ode_rmse", "self_rmse", "swd", "nll", "swd_floor", "nll_floor", "num_samples",
          "seconds"]


def model_parts(spec: str, teacher, teacher_grid: str = "uniform"):
    """(name, denoiser, k-step sampler, recorded step counts) of ``name=file`` or ``teacher``."""
    if spec == "teacher":  # k DDIM steps from t_max, the k-th onto clean data (a student's k-step grid)
        return ("teacher", teacher.denoise,
                lambda noise, k: sample(teacher, noise, solver="euler", nfe=k, grid=teacher_grid, final="direct"), None)
    name, _, path = spec.rpartition("=")
    from students import load_student

    student = load_student(path)
    return (name or Path(path).parent.name, student.denoise, lambda noise, k: student.sample(noise, k), student.sampling_steps)


def evaluate(teacher, specs: list[str], steps: list[str], num_samples: int, seed: int = 0,
             teacher_grid: str = "uniform", progress: bool = False) -> list[dict]:
    """The rows of every model (module doc); ``progress``: a tqdm bar over the evaluations (each model's ODE and
    step counts)."""
    models = [model_parts(spec, teacher, teacher_grid) for spec in specs]  # every student file read before any work
    problem = make_problem(teacher, num_samples, seed)
    s, rows = teacher.schedule, []
    x_T = problem.noise * float(s.init_noise_scale(s.t_max))
    counts = [recorded if "own" in steps and recorded else [int(k) for k in steps if k != "own"] for *_, recorded in models]
    bar = tqdm(total=sum(1 + len(c) for c in counts), desc="reflow_eval", unit="eval", disable=not progress)
    with bar:
        for (name, denoiser, sampler, recorded), model_counts in zip(models, counts):
            bar.set_postfix_str(f"{name} ode", refresh=False)
            t0 = time.perf_counter()
            with torch.no_grad():
                ts, states = ode_path(lambda x, t, c: denoiser(x.float(), t, c).double(), x_T, s)
            row = {"model": name, "steps": "ode", "straightness": straightness(ts, states)}
            end = states[:, -1]
            rows.append({**row, **metrics(problem, end, end), "seconds": time.perf_counter() - t0})
            bar.update(1)
            for k in model_counts:
                bar.set_postfix_str(f"{name} {k} steps", refresh=False)
                t0 = time.perf_counter()
                with torch.no_grad():
                    x = sampler(problem.noise.float() if recorded is not None else problem.noise, k).double()
                rows.append({"model": name, "steps": k, "straightness": "", **metrics(problem, x, end),
                             "seconds": time.perf_counter() - t0})
                bar.update(1)
    return rows


def metrics(problem, x: torch.Tensor, own_end: torch.Tensor) -> dict:
    return {"ode_rmse": rmse(x, problem.reference), "self_rmse": rmse(x, own_end), "swd": sliced_wasserstein(x, problem.data),
            "nll": float(-problem.teacher.log_prob(x).mean()), "swd_floor": problem.swd_floor, "nll_floor": problem.nll_floor,
            "num_samples": len(x)}


def write(rows: list[dict], out: Path, header: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out.with_suffix(".csv"), csv_text(rows, FIELDS))  # atomic (distill.core.atomic)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    cols = FIELDS[:7]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


@reports_write_errors  # a full disk or a read-only folder: one sentence, the files before kept
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--models", nargs="+", required=True, metavar="teacher|NAME=FILE")
    p.add_argument("--steps", nargs="+", default=["1", "2", "4"],
                   help="step counts; with 'own' among them the students take their recorded counts only")
    p.add_argument("--teacher-grid", default="uniform", choices=GRIDS, help="spacing of the teacher's k DDIM steps")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output stem: writes <out>.csv and <out>.md")
    args = p.parse_args(argv)
    try:
        teacher = load_teacher(args.teacher)
        rows = evaluate(teacher, args.models, args.steps, args.num_samples, args.seed, args.teacher_grid, progress=True)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    header = (f"Teacher {args.teacher}; {args.num_samples} samples, noise seeds {args.seed}.. (the bench's); "
              f"`steps` ode = the model's own fine ODE solve (200 Heun steps), k = k DDIM steps (the teacher's on a "
              f"{args.teacher_grid} grid, the last step onto clean data).")
    write(rows, Path(args.out), header)
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
