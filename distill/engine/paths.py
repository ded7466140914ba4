"""Output paths checked before any work: one sentence naming the path and why it cannot be written.

``check_output_file(path, option)`` and ``check_output_dir(path, option)`` raise ``OutputPathError`` (a
``ValueError``) when a file is where a folder is needed or the other way round, or when the folder that
would hold the output is not writable. They create nothing, so a refused command leaves no trace.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (checkpoint manifests, run lineage, student teachers)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class OutputPathError(ValueError):
    """An output path that cannot be written as asked."""


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (for a relative path, possibly ``.``)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _check_ancestors(path: Path, option: str) -> None:
    """The folders above ``path`` are folders (or can be made) and the nearest existing one is writable."""
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise OutputPathError(f"{option} {str(path)!r} cannot be written: {str(base)!r} is a file, not a folder")
    if not _writable(base):
        raise OutputPathError(f"{option} {str(path)!r} cannot be written: the folder {str(base)!r} is read-only")


def check_output_file(path: str | Path, option: str = "output file") -> Path:
    """``path`` as a Path if a file can be written there (created or replaced), else ``OutputPathError``."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{option} {str(path)!r} is a folder, but a file is expected there")
    _check_ancestors(path, option)  # files are written to a temporary name beside them, then renamed
    return path


def check_output_dir(path: str | Path, option: str = "output folder", files: tuple[str, ...] = ()) -> Path:
    """``path`` as a Path if it is (or can be made) a writable folder, and each name in ``files`` inside it can be
    written as a file; else ``OutputPathError``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{option} {str(path)!r} is a file, but a folder is expected there")
    if path.is_dir() and not _writable(path):
        raise OutputPathError(f"{option} {str(path)!r} is a read-only folder")
    if not path.is_dir():
        _check_ancestors(path, option)
    for name in files:
        if (path / name).is_dir():
            raise OutputPathError(f"{option} {str(path)!r} holds a folder {name!r} where the file {name!r} is to be written")
    return path


def check_resumable_output(path: str | Path, option: str = "output file", suffix: str = ".state.pt") -> tuple[Path, Path]:
    """(``path``, its resume state ``<path><suffix>``), both checked by ``check_output_file``: a preparation script
    (EMS, GITS, AMED) that resumes from a state file refuses a bad output before it writes that state."""
    path = check_output_file(path, option)
    return path, check_output_file(path.with_name(path.name + suffix), f"the state file of {option}")
