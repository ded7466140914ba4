"""The lineage of a student file: which teacher its chain of distillation runs started from.

A student distilled from another student (``teacher: student:<file>``) records its direct teacher's hash and, since
``root_teacher_hash`` exists, the first teacher of its chain; ``root_teacher`` recovers the latter for files from
before that key by following the parent files.
"""

from __future__ import annotations

from pathlib import Path

from distill.engine.paths import file_sha256


def root_teacher(info: dict, near: str | Path | None = None) -> tuple[str, str]:
    """(name, hash) of the first teacher of a student's chain: the file's ``root_teacher_hash`` when it records one,
    else (a file from before that key) its parent's root, the parent being the ``student:<file>`` it names when that
    file is on disk with the recorded hash, or a file with that hash in the folder ``near`` (the student's own, where
    a chain's files are committed side by side; each file there is hashed once), else its own teacher."""
    from safetensors import safe_open

    by_hash = None
    for _ in range(64):  # a chain is a few rounds long; this bounds a cycle of hand-edited files
        if info.get("root_teacher_hash"):
            return str(info.get("root_teacher") or ""), str(info["root_teacher_hash"])
        name, digest = str(info.get("teacher") or ""), str(info.get("teacher_hash") or "")
        if not name.startswith("student:"):
            break
        parent = Path(name[len("student:"):])
        if not (parent.is_file() and file_sha256(parent) == digest):
            if by_hash is None:
                by_hash = {file_sha256(p): p for p in sorted(Path(near).glob("*.safetensors"))} if near else {}
            parent = by_hash.get(digest)
        if parent is None:
            break
        with safe_open(str(parent), "pt") as f:
            info = f.metadata() or {}
    return str(info.get("teacher") or ""), str(info.get("teacher_hash") or "")
