"""Atomic, resumable checkpoints and a data order that is a pure function of (seed, step).

A checkpoint is written to ``step-N.tmp``, a ``manifest.json`` is written last (it lists every file of the
checkpoint with its size and sha256), then the folder is renamed to ``step-N``; old ones are deleted only
after that, and never the one just written. ``latest_valid_checkpoint`` returns the newest checkpoint whose
manifest parses and whose files match it, with the newer ones it skipped and why; folders without a
manifest (a run killed mid-write) are skipped too. Manifests written before the file list existed are
valid when they parse. A write the disk refuses (full, read-only) removes ``step-N.tmp`` and raises
``distill.core.atomic.OutputWriteError``; the checkpoints already written stay as they were.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from distill.core.atomic import give_umask_modes, replace_folder, writing
from distill.engine.paths import file_sha256

MANIFEST = "manifest.json"


def _step_of(path: Path) -> int | None:
    """N of a ``step-N`` folder name, else None."""
    head, _, number = path.name.partition("-")
    return int(number) if head == "step" and number.isdigit() else None


def _step_folders(root: str | Path) -> list[Path]:
    """Every ``step-N`` folder under ``root`` (not ``step-N.tmp``), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None), key=_step_of)


def complete_checkpoints(root: str | Path) -> list[Path]:
    """The ``step-N`` folders that have a manifest (not checked further), oldest first."""
    return [p for p in _step_folders(root) if (p / MANIFEST).is_file()]


def file_list(folder: str | Path) -> list[dict]:
    """``[{"path", "size", "sha256"}]`` of every file under ``folder`` but the manifest (paths relative, with /)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST)
    return [{"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size, "sha256": file_sha256(p)} for p in files]


def _file_problem(folder: Path, entry: dict) -> str | None:
    """Why one file listed in a manifest does not match it, or None."""
    rel = str(entry.get("path", ""))
    path = folder / rel
    if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        return f"its manifest lists an invalid file path {rel!r}"
    if not path.is_file():
        return f"{rel} is missing"
    size = path.stat().st_size
    if size != entry.get("size"):
        return f"{rel} has {size} bytes, its manifest records {entry.get('size')} (truncated or replaced)"
    if "sha256" in entry and file_sha256(path) != entry["sha256"]:
        return f"{rel} does not match the sha256 its manifest records (corrupt)"
    return None


def _parse_manifest(folder: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) or (None, why it cannot be used)."""
    path = folder / MANIFEST
    if not path.is_file():
        return None, f"it has no {MANIFEST} (a write that did not finish)"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"its {MANIFEST} is empty or not valid JSON ({e})" if path.stat().st_size else f"its {MANIFEST} is empty"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("step"), int):
        return None, f"its {MANIFEST} has no integer 'step'"
    return manifest, None


def checkpoint_problem(folder: str | Path) -> str | None:
    """None if ``folder`` is a usable checkpoint, else why not (one clause, e.g. "model.safetensors is missing").

    Usable: its manifest parses, has an integer ``step`` equal to the folder's N, and every file it lists
    exists with the recorded size and sha256 (a manifest without a file list, from before lists were written,
    is accepted as it is)."""
    folder = Path(folder)
    if not folder.is_dir():
        return "it is not a folder"
    manifest, problem = _parse_manifest(folder)
    if problem:
        return problem
    if _step_of(folder) is not None and manifest["step"] != _step_of(folder):
        return f"its {MANIFEST} says step {manifest['step']}, not {_step_of(folder)}"
    files = manifest.get("files", [])
    if not isinstance(files, list) or not all(isinstance(e, dict) for e in files):
        return f"its {MANIFEST} has a malformed file list"
    return next((p for p in (_file_problem(folder, e) for e in files) if p), None)


def latest_valid_checkpoint(root: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest usable ``step-N`` folder under ``root`` or None, [(newer folder skipped, why)], newest first)."""
    skipped = []
    for folder in reversed(_step_folders(root)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def skipped_messages(skipped: list[tuple[Path, str]]) -> list[str]:
    """One sentence per skipped checkpoint, for the log."""
    return [f"note: skipped checkpoint {str(path)!r}: {why}" for path, why in skipped]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest usable checkpoint under ``root`` (see ``latest_valid_checkpoint``), or None."""
    return latest_valid_checkpoint(root)[0]


def rotate_checkpoints(root: str | Path, keep: int, just_written: Path) -> None:
    """Delete all complete checkpoints but the ``keep`` highest steps and ``just_written``."""
    found = complete_checkpoints(root)
    for old in found[:-keep]:
        if old.resolve() != Path(just_written).resolve():
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(root: str | Path, step: int, write: Callable[[Path], None], manifest: dict, keep: int = 2,
                    is_main: bool = True, barrier: Callable[[], None] | None = None) -> Path:
    """``write(tmp_dir)`` fills the folder (on every rank); the main rank then commits it atomically.

    With several processes pass ``barrier`` (e.g. ``accelerator.wait_for_everyone``): it runs after the
    main rank has made the empty folder and after every rank has written, before the manifest."""
    root = Path(root)
    tmp, final = root / f"step-{step}.tmp", root / f"step-{step}"
    kept = complete_checkpoints(root)
    then = f"the checkpoints already written ({', '.join(p.name for p in kept) or 'none'}) were left as they were"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    with writing(final, tmp if is_main else None, then):  # a full disk or a read-only folder: one sentence, no step-N.tmp
        if is_main:
            tmp.mkdir(parents=True)
        if barrier is not None:
            barrier()
        write(tmp)
        if barrier is not None:
            barrier()
        if is_main:
            (tmp / MANIFEST).write_text(json.dumps({"step": step, **manifest, "files": file_list(tmp)}, indent=1))
            give_umask_modes(tmp)
            replace_folder(tmp, final)
    if is_main:
        rotate_checkpoints(root, keep, final)
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
