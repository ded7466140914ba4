"""Selection on tune data only (issue #31, item 8): a choice among candidate student files (checkpoints, EMA or raw
weights, sampling times, guidance) made by FID against the mnist16 ``tune`` split (1,000 training digits that no
reported number uses) on tune noise seeds disjoint from every reporting seed, and recorded in the chosen file's
metadata (``selection``: the rule, split, seeds, each candidate's FID, the choice), so a reader sees what was chosen,
among what, and on which data."""

from __future__ import annotations

import json
import math
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from distill.core.atomic import write_with
from distill.eval.bench.cells import Cell, generate
from distill.eval.bench.config import BenchConfig
from distill.eval.bench.metrics import FidMetric, reference_set

REPORTING_SEEDS = 100_000  # the bench's reporting seeds are 0..N-1 with N <= 20,000: tune seeds start at or above this
TUNE_SPLIT = "tune"


def check_tune_seed(seed: int) -> None:
    if seed < REPORTING_SEEDS:
        raise ValueError(f"--seed {seed} may overlap the reporting seeds 0..{REPORTING_SEEDS - 1}; allowed: a tune seed of at "
                         f"least {REPORTING_SEEDS}")


def tune_fids(teacher, candidates: dict[str, object], steps: int, num_samples: int, seed: int, batch_size: int = 500,
              fid_cache: str | None = "runs/fid_cache") -> dict[str, float]:
    """FID of each candidate student (at ``steps``) against the tune split, on seeds seed..seed+N-1."""
    check_tune_seed(seed)
    cfg = BenchConfig(num_samples=num_samples, seed=seed, batch_size=batch_size)
    cfg.validate(teacher)
    metric = FidMetric(reference_set("mnist16", TUNE_SPLIT, "image", teacher.data_shape), cache_root=fid_cache, bootstrap=0)
    out = {}
    for name, student in candidates.items():
        x = generate(teacher, Cell(name, "student", steps, steps), cfg, student)[0]
        out[name] = float(metric(x, memorization=False)["fid"])
    return out


def choose(fids: dict[str, float]) -> str:
    finite = {k: v for k, v in fids.items() if math.isfinite(v)}
    if not finite:
        raise ValueError("no candidate has a finite FID on the tune split")
    return min(finite, key=finite.get)


def write_selected(source: Path, out: Path, record: dict) -> None:
    """Copy the chosen student file to ``out`` with ``record`` as its ``selection`` metadata (tensors unchanged)."""
    with safe_open(str(source), "pt") as f:
        meta, tensors = dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    meta["selection"] = json.dumps(record, sort_keys=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_with(out, lambda tmp: save_file(tensors, str(tmp), metadata=meta))  # atomic (distill.core.atomic)


def sidecar(path: Path) -> Path:
    """Where the selection record of a file that is recorded in place lives: ``<stem>.selection.json`` beside it."""
    return Path(path).with_name(Path(path).stem + ".selection.json")


def write_record_beside(path: Path, record: dict) -> Path:
    """Record a selection for ``path`` without changing the file: its content hash is the identity other students were
    distilled from (a chained student's teacher) and the key of every cached measurement, so the record goes beside it."""
    from distill.core.atomic import write_text

    out = sidecar(path)
    write_text(out, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return out


def read_selection(path: Path) -> dict | None:
    """A student file's selection record: its ``selection`` metadata, else its sidecar (``write_record_beside``)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("selection"):
        return json.loads(meta["selection"])
    side = sidecar(path)
    return json.loads(side.read_text()) if side.is_file() else None

