"""The rows of ``fid_vs_nfe.csv``: the run's settings as stored, reading the file back, and ``run_bench``, which
runs every cell not yet there (then the data rows), rewriting the file after each."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from distill.eval.bench.cells import Cell, generate, save_cell_samples, save_png_folder
from distill.eval.bench.config import CSV, FIELDS, PROTOCOL, BenchConfig, is_image, label_mode, labels_for
from distill.eval.bench.student import student_teacher_hash
from distill.eval.solver_error import read_rows, write_rows


def run_config(teacher, cfg: BenchConfig, reference_id: str) -> dict[str, str]:
    """The CONFIG_FIELDS of this run's rows, as the CSV stores them."""
    scale = "" if cfg.guidance_scale is None else f"{cfg.guidance_scale:g}"
    return {"num_samples": str(cfg.num_samples), "seed": str(cfg.seed), "guidance_scale": scale, "grid": cfg.grid,
            "final": cfg.final, "labels": label_mode(teacher, cfg), "teacher_hash": teacher.hash, "reference_id": reference_id,
            "protocol": PROTOCOL}


def read_bench_rows(path: str | Path) -> list[dict]:
    """The rows of a bench CSV; files written before the ``final`` column existed used ``final="clean"``, before
    the ``protocol`` column protocol 1 (the floor at its own size, no spread); other missing columns are blank."""
    rows = read_rows(path)
    for r in rows:
        r.setdefault("final", "clean")
        r.setdefault("protocol", "1")
        for k in FIELDS:
            r.setdefault(k, "")
    return rows


def has_row(rows: list[dict], config: dict[str, str], kind: str, method: str | None = None, nfe: int | None = None) -> bool:
    return any(r["kind"] == kind and (method is None or r["method"] == method) and (nfe is None or r["nfe"] == str(nfe))
               and all(r[k] == v for k, v in config.items()) for r in rows)


def run_bench(teacher, cells: list[Cell], cfg: BenchConfig, metric, out: str | Path, *, students: dict | None = None,
              student_columns: dict | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Run every cell not yet in ``out/fid_vs_nfe.csv`` (then the data rows), rewriting the CSV after each.

    ``metric(x, labels=) -> {column: value}`` with ``reference_id``, ``check(n)``, ``data_kinds()`` and ``data_row(kind, n)``
    (``FidMetric``, ``ExactMetric``); ``students`` maps a student cell's method name to an object with
    ``.sample(noise, steps=, cond=)``, ``student_columns`` to extra columns of its rows (path, training cost).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, students, student_columns = out / CSV, students or {}, student_columns or {}
    metric.check(cfg.num_samples)
    rows = read_bench_rows(csv_path)
    config = run_config(teacher, cfg, metric.reference_id)
    stale = stale_student_rows(rows, config, student_columns)
    if stale:
        log(f"{len(stale)} rows of {csv_path} were measured on another file of the same student name "
            f"({', '.join(sorted({r['method'] for r in stale}))}); measured again")
        rows = [r for r in rows if not any(r is x for x in stale)]
    todo = [c for c in cells if not has_row(rows, config, c.kind, c.method, c.nfe)]
    if len(todo) < len(cells):
        log(f"{len(cells) - len(todo)} of {len(cells)} cells already in {csv_path}; skipped")
        if refresh_student_columns(rows, config, student_columns):  # e.g. a cost sidecar written after the first bench
            write_rows(csv_path, rows, FIELDS)
    reference = getattr(metric, "reference", None)
    if cfg.save_images and reference is not None and not (out / "images" / "reference").is_dir():
        save_png_folder(reference, out / "images" / "reference")  # what torch-fidelity's CLI compares a cell's folder with
    for cell in tqdm(todo, desc="FID vs NFE", disable=not todo):
        rows.append(run_cell(teacher, cell, cfg, metric, out, students.get(cell.method), log)
                    | student_columns.get(cell.method, {}) | config)
        write_rows(csv_path, rows, FIELDS)
    for kind in metric.data_kinds():  # real data at the cells' sample count, against the same reference
        if not has_row(rows, config, kind):
            rows.append({**metric.data_row(kind, cfg.num_samples), "kind": kind, "teacher": teacher.name, **config})
            write_rows(csv_path, rows, FIELDS)
    return rows


def stale_student_rows(rows: list[dict], config: dict[str, str], student_columns: dict) -> list[dict]:
    """Student rows of these settings whose recorded file hash is not the hash of the file benched now under their name
    (a retrained or reselected student written over the old file). Rows from before the hash column have it empty:
    unknown, kept."""
    def stale(r) -> bool:
        now = (student_columns.get(r["method"]) or {}).get("student_sha256")
        return (r["kind"] == "student" and bool(now) and r.get("student_sha256", "") not in ("", now)
                and all(r.get(k) == v for k, v in config.items()))
    return [r for r in rows if stale(r)]


def refresh_student_columns(rows: list[dict], config: dict[str, str], student_columns: dict) -> int:
    """Bring the student columns (file path, training cost) of rows already in the CSV up to date with the files now:
    they are not settings, so a cell with the same settings is skipped, but a cost sidecar written after its first bench
    belongs in its row. Returns how many rows changed."""
    changed = 0
    for r in rows:
        columns = student_columns.get(r["method"]) if r["kind"] == "student" else None
        if not columns or not all(r.get(k) == v for k, v in config.items()):
            continue
        fresh = {k: "" if v is None else str(v) for k, v in columns.items() if k != "student_sha256" or r.get(k)}
        if any(r.get(k, "") != v for k, v in fresh.items()):
            r.update(fresh)
            changed += 1
    return changed


def run_cell(teacher, cell: Cell, cfg: BenchConfig, metric, out: Path, student, log: Callable[[str], None]) -> dict:
    """Sample one cell, keep its pictures, and return its row (without the run's settings)."""
    x, seconds = generate(teacher, cell, cfg, student)
    bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
    if bad:
        log(f"note: {cell.method} at {cell.nfe} NFE gave {bad} non-finite samples")
    if is_image(teacher):
        save_cell_samples(x, cell, out)
    if cfg.save_images:
        save_png_folder(x, out / "images" / cell.name)
    labels = labels_for(teacher, cfg, 0, cfg.num_samples)
    return {"method": cell.method, "kind": cell.kind, "nfe": str(cell.nfe), "steps": str(cell.steps), **metric(x, labels=labels),
            "seconds_per_sample": seconds / len(x), "teacher": teacher.name, "student_teacher_hash": student_teacher_hash(student)}
