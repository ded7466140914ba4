"""The HF image dataset part of the memory benchmark (``distill.eval.engine_bench.memory``, ``--parts dataset``).

For each of ``--dataset-sizes``, a ``datasets`` image dataset is synthesized in ``--tmp`` (``Dataset.from_dict``: an
``image`` column of random 16x16 grayscale uint8 arrays typed ``datasets.Image()`` (PNG bytes in the Arrow table), a
``label`` ClassLabel column 0..9; a fixed seed; written in chunks of 10,000 rows, each chunk saved and memory-mapped
back, then concatenated and written with ``save_to_disk``, so the writer never holds the set). A child process trains
the ``diffusion`` objective on it (``dataset: hf:<folder>``, read by ``distill.data``: ``load_from_disk``, rows
decoded by a ``with_transform``; the mnist16 teacher's network copied as the student, batch 64, one thread) and
reports its memory as the cache children do, the resident bytes of its mappings of the dataset's files and the number
of images it decoded. On the largest size, exact resume: one child trains 2 x ``--dataset-steps`` steps; another stops
at ``--dataset-steps`` (``stop_at``, after its checkpoint) and a third resumes that folder (``resume="latest"``); the
final student files of the two runs are compared tensor by tensor (``bit_identical``). The datasets and runs are
deleted after.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from distill.eval.engine_bench import ROOT
from distill.eval.engine_bench.processes import MB, mapped_rss, mib, proc_status, run_child

DATASET_CONFIG = "cd_mnist16.yaml"  # the mnist16 teacher; the objective replaced by ``diffusion`` (its options cleared)
DATASET_CHUNK = 10_000  # rows a chunk of the writer


def synthesize_dataset(folder: Path, num_rows: int, seed: int = 0, chunk: int = DATASET_CHUNK) -> Path:
    """A ``save_to_disk`` image dataset (module doc): random 16x16 grayscale images, labels 0..9, written in chunks."""
    import datasets
    import numpy as np

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    rng, parts_dir, parts = np.random.default_rng(seed), folder.parent / f"{folder.name}_parts", []
    try:
        for k, first in enumerate(range(0, num_rows, chunk)):
            m = min(chunk, num_rows - first)
            part = datasets.Dataset.from_dict({"image": list(rng.integers(0, 256, (m, 16, 16), dtype=np.uint8)),
                                               "label": ((first + np.arange(m)) % 10).tolist()}, features=features)
            part.save_to_disk(str(parts_dir / f"{k:05d}"))
            del part
            parts.append(datasets.load_from_disk(str(parts_dir / f"{k:05d}")))  # memory-mapped
        datasets.concatenate_datasets(parts).save_to_disk(str(folder))
    finally:
        del parts
        shutil.rmtree(parts_dir, ignore_errors=True)
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def dataset_child(spec: dict) -> dict:
    """In the child: the ``diffusion`` objective on the dataset (``stop_at`` / ``resume`` when given), then report memory
    and the images decoded (``distill.data.image_tensor`` calls)."""
    import distill.data
    from distill.engine.config import parse_overrides
    from distill.engine.run_config import load_run_config
    from distill.engine.train import run_steps, start
    from distill.eval.engine_bench import build_student, load_teacher

    decoded, real = [0], distill.data.image_tensor

    def counted(*args, **kwargs):
        decoded[0] += 1
        return real(*args, **kwargs)

    distill.data.image_tensor = counted
    before = proc_status()
    cfg = load_run_config(ROOT / "configs" / "distill" / DATASET_CONFIG, parse_overrides([
        f"dataset=hf:{spec['dataset']}", "objective.name=diffusion", "student.parameterization=denoiser",
        "batch_size=64", f"max_steps={spec['steps']}", f"checkpoint_every={spec['checkpoint_every']}",
        f"log_every={spec['checkpoint_every']}", f"output_dir={spec['out']}"]))
    run, step = start(cfg, load_teacher, build_student, spec.get("resume"), lambda m: None)
    set_up, t0 = proc_status(), time.time()
    with run.lock:
        run_steps(run, step, spec.get("stop_at"), lambda m: None)
    return {"after_imports": before, "after_setup": set_up, "end": proc_status(), "start_step": step,
            "train_seconds": time.time() - t0, "dataset_mapped_rss": mapped_rss(Path(spec["dataset"])),
            "rows_decoded": decoded[0], "arrow_table": type(run.data.data.ds.data).__name__}


def student_files_identical(a: Path, b: Path) -> dict[str, bool]:
    """Per final student file (``*.safetensors`` at the top of the run folders): the same keys and equal tensors."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for f in sorted(p.name for p in a.glob("*.safetensors")):
        x, y = load_file(str(a / f)), load_file(str(b / f)) if (b / f).is_file() else {}
        out[f] = x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    return out


def measure_dataset(sizes: list[int], steps: int, tmp: Path, log) -> dict:
    rows, resume = [], {}
    for n in sizes:
        folder = tmp / f"dataset_{n}"
        try:
            t0 = time.time()
            synthesize_dataset(folder, n)
            size = folder_bytes(folder)
            log(f"dataset of {n} rows: {size / MB:.1f} MiB on disk in {time.time() - t0:.0f} s")
            r = run_child({"kind": "dataset", "dataset": str(folder), "steps": steps, "checkpoint_every": steps,
                           "out": str(tmp / f"run_dataset_{n}")})
            rows.append({"num_rows": n, "dataset_bytes": size, "steps": steps, "batch_size": 64, **r})
            log(f"  diffusion: peak RSS {r['ru_maxrss'] / MB:.0f} MiB, dataset pages resident "
                f"{r['dataset_mapped_rss'] / MB:.1f} MiB, {r['rows_decoded']:,} images decoded")
            if n == sizes[-1]:
                resume = check_resume(folder, steps, tmp, log)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(tmp / f"run_dataset_{n}", ignore_errors=True)
    return {"rows": rows, "resume": resume}


def check_resume(folder: Path, steps: int, tmp: Path, log) -> dict:
    """On ``folder``: 2 x ``steps`` steps in one child against ``steps`` in one, resumed in another (module doc)."""
    full, split = tmp / "run_resume_full", tmp / "run_resume_split"
    spec = {"kind": "dataset", "dataset": str(folder), "steps": 2 * steps, "checkpoint_every": steps}
    try:
        children = {"full": run_child({**spec, "out": str(full)}),
                    "stopped": run_child({**spec, "out": str(split), "stop_at": steps}),
                    "resumed": run_child({**spec, "out": str(split), "resume": "latest"})}
        files = student_files_identical(full, split)
        out = {"num_rows": int(folder.name.rsplit("_", 1)[1]), "steps": 2 * steps, "stop_at": steps,
               "resumed_from_step": children["resumed"]["start_step"], "files": files,
               "bit_identical": bool(files) and all(files.values()),
               "peak_rss": {k: v["ru_maxrss"] for k, v in children.items()}}
        log(f"resume on {out['num_rows']} rows: {2 * steps} steps against {steps} + resumed from step "
            f"{out['resumed_from_step']}: bit_identical {out['bit_identical']} ({', '.join(f'{k} {v}' for k, v in files.items())})")
        return out
    finally:
        shutil.rmtree(full, ignore_errors=True)
        shutil.rmtree(split, ignore_errors=True)


# -- the report ------------------------------------------------------------------------------------------


def dataset_table(rows: list[dict]) -> list[str]:
    lines = ["| rows | on disk MiB | steps | images decoded | dataset resident MiB | after setup MiB | peak RSS MiB "
             "| delta MiB | anon MiB | file MiB | Arrow table |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['num_rows']:,} | {mib(r['dataset_bytes'])} | {r['steps']} | {r['rows_decoded']:,} | "
                     f"{mib(r['dataset_mapped_rss'])} | {mib(r['after_setup']['VmRSS'])} | {mib(r['ru_maxrss'])} | "
                     f"{mib(r['ru_maxrss'] - rows[0]['ru_maxrss'])} | {mib(r['end']['RssAnon'])} | {mib(r['end']['RssFile'])} "
                     f"| {r['arrow_table']} |")
    return lines


def markdown_lines(ds: dict | None) -> list[str]:
    """The dataset section of memory.md (none when the part has not been run)."""
    lines = []
    if ds and ds.get("rows"):
        lines += ["", "## An HF image dataset on disk (save_to_disk)", "", f"Command: `{ds['command']}`  ",
                  f"Hardware: {ds['hardware']}; torch {ds['torch']}; datasets {ds['datasets']}; {ds['date']}.", "",
                  "Synthesized with `datasets` (`Dataset.from_dict`: random 16x16 grayscale images typed `datasets.Image()`, "
                  "stored as PNG bytes, labels 0..9; fixed seed; written in chunks of 10,000 rows, then `save_to_disk`) and "
                  "trained on as `dataset: hf:<folder>` (`distill.data`: `load_from_disk`, rows decoded by `with_transform`): "
                  "the `diffusion` objective, the mnist16 teacher's network copied as the student, batch 64, one thread, in "
                  "a child process. Peak RSS: `ru_maxrss` of the child (`wait4`); delta: minus that on the smallest dataset. "
                  "Images decoded: calls of `distill.data.image_tensor` in the child (steps x batch when only the batches' "
                  "rows are decoded). Dataset resident: bytes of the dataset's files mapped into the process "
                  "(/proc/self/smaps) at the end. After setup: RSS once the data, networks and optimizer are built. Anon / "
                  "file: RssAnon / RssFile at the end.", "", *dataset_table(ds["rows"])]
        first, last = ds["rows"][0], ds["rows"][-1]
        if last is not first:
            grow = {k: mib(last["end"][k] - first["end"][k]) for k in ("RssAnon", "RssFile")}
            lines += ["", f"From {first['num_rows']:,} to {last['num_rows']:,} rows: RssAnon {grow['RssAnon']} MiB, RssFile "
                      f"{grow['RssFile']} MiB, peak RSS {mib(last['ru_maxrss'] - first['ru_maxrss'])} MiB. The dataset's "
                      "pages are resident from the start (after setup) because opening the table reads the whole file: "
                      "`datasets` memory-maps it and reads it with pyarrow's IPC stream reader (`read_all`), which visits "
                      "every record batch's header (image columns are written 100 rows a batch), and the kernel's readahead "
                      "fills the rest; these are shared, file-backed pages the kernel can drop, not anonymous memory. The "
                      "rows are decoded only when a batch asks for them (images decoded = steps x batch)."]
        res = ds.get("resume")
        if res:
            files = ", ".join(f"{k}: {'identical' if v else 'DIFFERENT'}" for k, v in res["files"].items())
            lines += ["", f"Exact resume on the {res['num_rows']:,}-row dataset: {res['steps']} steps in one process against "
                      f"{res['stop_at']} steps (`stop_at`) in one and the rest resumed (`resume=\"latest\"`, from step "
                      f"{res['resumed_from_step']}) in another; final student files compared tensor by tensor: "
                      f"**bit_identical: {str(res['bit_identical']).lower()}** ({files}). Peak RSS of the three children: "
                      + ", ".join(f"{k} {mib(v)} MiB" for k, v in res["peak_rss"].items()) + "."]
    return lines
