"""Atomic, resumable checkpoints and a data order that is a pure function of (seed, step).

A checkpoint is written to ``step-N.tmp``, a ``manifest.json`` is written last, then the folder is
renamed to ``step-N``; old ones are deleted only after that. ``latest_checkpoint`` ignores folders
without a manifest, so a run killed mid-write resumes from the previous complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

MANIFEST = "manifest.json"


def complete_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(root: str | Path, step: int, write: Callable[[Path], None], manifest: dict, keep: int = 2,
                    is_main: bool = True, barrier: Callable[[], None] | None = None) -> Path:
    """``write(tmp_dir)`` fills the folder (on every rank); the main rank then commits it atomically.

    With several processes pass ``barrier`` (e.g. ``accelerator.wait_for_everyone``): it runs after the
    main rank has made the empty folder and after every rank has written, before the manifest."""
    root = Path(root)
    tmp, final = root / f"step-{step}.tmp", root / f"step-{step}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if barrier is not None:
        barrier()
    write(tmp)
    if barrier is not None:
        barrier()
    if is_main:
        (tmp / MANIFEST).write_text(json.dumps({"step": step, **manifest}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_manifest(path: str | Path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Indices of the global batch at ``step``: positions [step*B, (step+1)*B) of the endless sequence of
    per-epoch permutations randperm(n, seed=(seed, epoch)). A pure function of its arguments, so a resumed
    run sees exactly the batches it would have seen."""
    start = step * batch_size
    out, pos = [], start
    while pos < start + batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = min(n - offset, start + batch_size - pos)
        out.append(perm[offset:offset + take])
        pos += take
    return torch.cat(out)


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """A generator for the noise of one step on one rank, reproducible without saved state."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 4099 + rank)
