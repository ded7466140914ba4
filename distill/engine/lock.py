"""One writer per output folder: an exclusive ``fcntl.flock`` on ``<folder>/.lock``.

A distillation run (``distill.engine.train``) and a bench (``scripts/bench.py``) hold the lock of their output folder
while they write it, so a second process aimed at the same folder stops with one sentence instead of mixing its config,
weights, metrics or CSV rows with the first one's. The kernel drops the lock when its process ends, however it ends
(a kill included), so a lock is never stale; the ``.lock`` file stays behind and only records the pid of its last
holder. The lock is taken before the first write; a folder written before under a lock (it has a ``.lock``) is locked
before it is read, so a second run is refused before it touches the first one's checkpoints, and a command refused
for any other reason leaves the folder as it was (no ``.lock`` made, an existing one restored). Of the processes of
one multi-process launch only rank 0 takes it (``launched_rank``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from distill.core.atomic import writing

LOCK_FILE = ".lock"


class FolderInUse(RuntimeError):
    """Another live process holds the output folder's lock."""


def launched_rank(environ=os.environ) -> int:
    """This process's rank in a launch (``RANK``, as torchrun and accelerate set it), 0 when launched alone."""
    return int(environ.get("RANK", "0") or 0)


class FolderLock:
    """``acquire()`` makes the folder if needed and locks it for writing, or raises ``FolderInUse``; ``release`` (or
    leaving a ``with`` block) unlocks. ``acquire_existing()`` locks a folder written before (it has a lock file) ahead of
    reading it, and a ``release`` with no ``acquire`` after it leaves the lock file as it found it, so a command that
    stops before writing changes nothing. ``enabled=False``: both do nothing (a rank other than 0)."""

    def __init__(self, folder: str | Path, enabled: bool = True):
        self.folder, self.enabled, self._fd, self._previous = Path(folder), enabled, None, None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        if self.enabled and self._fd is None:
            with writing(self.folder / LOCK_FILE):  # a read-only or full folder: one sentence (OutputWriteError)
                self.folder.mkdir(parents=True, exist_ok=True)
                self._lock(os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644))
        self._previous = None  # writing now: the lock file keeps this process's pid
        return self

    def acquire_existing(self) -> FolderLock:
        with writing(self.folder / LOCK_FILE):  # a folder made read-only (or a full disk): one sentence, nothing changed
            try:
                fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CLOEXEC) if self.enabled and self._fd is None else None
            except (FileNotFoundError, NotADirectoryError):  # no lock file: nothing written here under a lock, nothing to take
                fd = None
            if fd is not None:
                self._previous = self._lock(fd)
        return self

    def _lock(self, fd: int) -> bytes:
        """Lock ``fd`` without waiting and write this process's pid into it; returns what the file held before."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FolderInUse(f"{self.folder} is in use by another process (pid {holder}); wait for it or choose "
                              f"another output folder") from None
        previous = os.pread(fd, 4096, 0)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:  # a full disk: the lock file as it was, the lock dropped
            with contextlib.suppress(OSError):
                os.pwrite(fd, previous, 0)
            os.close(fd)
            raise
        self._fd = fd
        return previous

    def release(self) -> None:
        if self._fd is not None:
            if self._previous is not None:  # locked ahead of reading, never written: the lock file as it was
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, self._previous, 0)
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = self._previous = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
