"""The bench end to end, as ``scripts/bench.py`` runs it: the device check, placing the teacher, ``parse_methods``'
solvers and variants planned into cells and run (``benchmark``), then the table and the pictures redrawn from the
files (``redraw``, also alone for ``--plot-only``)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from distill.core.atomic import append_text, write_text
from distill.eval.bench.cells import plan_cells
from distill.eval.bench.config import COST_PNG, CSV, DATA_KINDS, HEADLINE_PNG, PNG, TABLE, TEACHER_COST, BenchConfig, is_analytic
from distill.eval.bench.plots import plot_bench, plot_cost, plot_headline, save_method_grids
from distill.eval.bench.rows import read_bench_rows, run_bench
from distill.eval.bench.student import read_cost_file
from distill.eval.bench.tables import markdown_table


def check_device(device: str) -> None:
    """A CUDA device needs a GPU that torch sees."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} needs a GPU, but torch sees none; use --device cpu")


def read_teacher_cost(out: str | Path) -> dict | None:
    """The teacher's own training cost, ``out/teacher_cost.json`` (``read_cost_file``), or None when there is none."""
    path = Path(out) / TEACHER_COST
    return read_cost_file(path) if path.is_file() else None


def place_teacher(teacher, device: str) -> None:
    """Move a network teacher to ``device`` (an analytic teacher stays where it is: its samples follow the noise)."""
    if not is_analytic(teacher) and hasattr(teacher, "to"):
        teacher.to(device)


def benchmark(teacher, cfg: BenchConfig, metric, out: str | Path, solvers: list[str], nfes: list[int], *,
              students: dict | None = None, student_steps: list[int] = (), student_columns: dict | None = None,
              command: str | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Every solver (and ``cfg.variants`` label) at every NFE it can spend exactly and every student at every step
    count, run where not yet in ``out/fid_vs_nfe.csv`` (``run_bench``), then the table and the pictures redrawn
    (``redraw``). ``command``, the command line, is first appended to ``out/commands.txt``. Returns the CSV's rows."""
    out, students = Path(out), students or {}
    cells = plan_cells(solvers, nfes, list(students), student_steps, log=log, variants=cfg.variants)
    out.mkdir(parents=True, exist_ok=True)
    if command is not None:
        append_text(out / "commands.txt", command + "\n")
    rows = run_bench(teacher, cells, cfg, metric, out, students=students, student_columns=student_columns, log=log)
    redraw(out)
    return rows


def redraw(out: str | Path, plot_with: list[Path] = ()) -> None:
    """fid_vs_nfe.png with fid_headline.png beside it (FID benches), fid_vs_cost.png (when students record their cost),
    the table and the sample grids, from the files in ``out``; with ``plot_with`` also fid_vs_nfe_with_<names>.png,
    adding those folders' cells."""
    out, plot_with = Path(out), [Path(f) for f in plot_with]
    teacher_cost = read_teacher_cost(out)  # checked before any picture is drawn
    rows = read_bench_rows(out / CSV)
    if not any(r["kind"] not in DATA_KINDS for r in rows):
        raise FileNotFoundError(f"no benchmark cells in {out / CSV}")
    if plot_with:  # one more picture with the cells of other folders of the same settings (e.g. the classic solvers)
        others = []
        for folder in plot_with:
            if not (folder / CSV).is_file():
                raise FileNotFoundError(f"no {CSV} in {folder} (--plot-with)")
            others += [r for r in read_bench_rows(folder / CSV) if r["kind"] not in DATA_KINDS]
        plot_bench(others + rows, out / PNG.replace(".png", "_with_" + "_".join(f.name for f in plot_with) + ".png"))
    plot_bench(rows, out / PNG)
    plot_headline(rows, out / HEADLINE_PNG)
    plot_cost(rows, out / COST_PNG, teacher_cost)
    write_text(out / TABLE, markdown_table(rows))
    save_method_grids(out)
