"""Output files written whole or not at all, and one sentence when the disk or a permission refuses a write.

Every file the project writes goes to a temporary name in its own folder, is flushed and fsynced, gets the mode a
plain ``open(path, "w")`` would give it (``0o666 & ~umask``; ``mkstemp`` alone leaves 0600), and is then renamed onto
its name with ``os.replace`` (atomic within one file system): a reader sees the old file or the new one, never half of
one. A folder (a checkpoint, a pipeline folder) is filled under ``<name>.tmp`` and renamed the same way; a folder it
replaces is moved aside first and put back if the rename fails.

A full disk, a folder made read-only, a permission taken away, an exceeded quota: the temporary file or folder is
removed, the target is left as it was, and ``OutputWriteError`` (a ``ValueError``, so every CLI prints it as
``error: <sentence>``) says which file and why, e.g. "could not write runs/x/cost.json: no space left on the device
(errno ENOSPC); nothing was changed". Libraries that lose the errno are read too: safetensors names it in its message
("os error 28"), torch.save only says "unexpected pos", so a write that failed without an errno on a folder with no
free space left is reported as a full disk.

    write_text(path, text)                 write_bytes(path, data)
    write_with(path, lambda tmp: save_file(tensors, str(tmp)))       # a library that writes to a path
    write_folder(folder, lambda tmp: model.save_pretrained(tmp))     # a folder filled by a callable
    append_text(path, text)                # all of it appended, or the file cut back to its old length
    write_text(path, csv_text(rows, fields))                         # a CSV (append_text for rows added to one)
    @reports_write_errors                  # on a CLI's main: "error: <sentence>", exit status 1, no traceback
"""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import io
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "the file is too large for the file system",
    errno.EIO: "an input/output error of the device",
    errno.EISDIR: "a folder is in the way",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENOENT: "its folder does not exist",
}
LOW_SPACE_BYTES = 64 * 1024  # a write that failed without an errno, with less than this free: the disk is full


class OutputWriteError(ValueError):
    """An output file or folder could not be written (disk full, read-only, permission); the target was not changed."""


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:  # Linux: read without setting it (os.umask sets it, for every thread)
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~_umask()


def _errno_of(error: BaseException, folder: Path) -> int | None:
    """The errno behind a failed write: the OSError's own, one a library names in its message ("os error 28"), or
    ENOSPC when the error carries none and ``folder`` has (almost) no free space left; else None (not a write error)."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno
    found = re.search(r"os error (\d+)", str(error))
    if found:
        return int(found.group(1))
    if isinstance(error, (OSError, RuntimeError)):  # torch.save: "unexpected pos"
        with contextlib.suppress(OSError):
            stat = os.statvfs(folder)
            if stat.f_bavail * stat.f_frsize < LOW_SPACE_BYTES:
                return errno.ENOSPC
    return None


def _elsewhere(error: BaseException, target: Path) -> bool:
    """``error`` names a file outside ``target``'s folder (a file being read, not the one being written)."""
    name = getattr(error, "filename", None)
    return isinstance(name, (str, os.PathLike)) and not Path(name).absolute().is_relative_to(target.parent.absolute())


def write_error(target: str | Path, error: BaseException, then: str = "nothing was changed") -> OutputWriteError | None:
    """``OutputWriteError`` naming ``target`` and the cause of ``error``, or None when ``error`` is no write error (or
    an error about a file elsewhere, e.g. one being read)."""
    target = Path(target)
    if _elsewhere(error, target):
        return None
    code = _errno_of(error, target.parent if target.parent.is_dir() else Path("."))
    if code is None:
        return None
    reason = REASONS.get(code) or (error.strerror if isinstance(error, OSError) and error.strerror else os.strerror(code))
    return OutputWriteError(f"could not write {target}: {reason} (errno {errno.errorcode.get(code, code)}); {then}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def writing(target: str | Path, tmp: str | Path | None = None, then: str = "nothing was changed"):
    """Within: the writes that make ``target`` (in ``tmp``, a file or folder removed on any failure); an error of the
    disk or of a permission becomes ``OutputWriteError`` (one sentence), any other propagates as it is."""
    try:
        yield
    except BaseException as error:
        inner = error.__cause__ if isinstance(error, OutputWriteError) and error.__cause__ else error  # a file inside
        diagnosed = write_error(target, inner, then)  # before the removal: the free space is read with the temp file there
        if tmp is not None:
            _remove(Path(tmp))
        if diagnosed is None:
            raise
        raise diagnosed from error


def _temp_path(path: Path) -> tuple[int, Path]:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    return fd, Path(name)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (module doc); returns ``path``."""
    path = Path(path)
    with writing(path):
        fd, tmp = _temp_path(path)
    with writing(path, tmp):
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (module doc); returns ``path``."""
    return write_bytes(path, text.encode())


def write_with(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` writes the file (safetensors' ``save_file``, ``torch.save``, ``fig.savefig`` with its format
    named), which then takes ``path``'s place atomically (module doc); returns ``path``."""
    path = Path(path)
    with writing(path):
        fd, tmp = _temp_path(path)
        os.close(fd)
    with writing(path, tmp):
        write(tmp)
        _fsync_file(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    return path


def write_folder(folder: str | Path, fill: Callable[[Path], object]) -> Path:
    """``fill(tmp)`` fills ``<folder>.tmp`` (made empty first), which then takes ``folder``'s place: a folder already
    there is moved aside, removed after the rename, and put back if the rename fails. Returns ``folder``."""
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    _remove(tmp)
    with writing(folder, tmp):
        tmp.mkdir(parents=True)
        fill(tmp)
        give_umask_modes(tmp)
        replace_folder(tmp, folder, old)
    return folder


def give_umask_modes(folder: str | Path) -> None:
    """Every file under ``folder`` gets ``file_mode()`` (safetensors' ``save_file`` makes its files 0600)."""
    mode = file_mode()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def replace_folder(tmp: Path, folder: Path, old: Path | None = None) -> None:
    """Rename ``tmp`` onto ``folder``; one already there goes to ``old`` first and back if the rename fails."""
    old = old or folder.with_name(folder.name + ".old")
    _remove(old)
    if not folder.exists():
        os.replace(tmp, folder)
        return
    os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except BaseException:
        os.replace(old, folder)
        raise
    _remove(old)


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` to ``path`` whole: on a failure the file is cut back to its old length (removed if it was new)
    and ``OutputWriteError`` names it."""
    path = Path(path)
    size = path.stat().st_size if path.is_file() else None
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError as error:
        with contextlib.suppress(OSError):  # a read-only folder refuses this too, but then nothing was written
            if size is None:
                path.unlink()
            else:
                os.truncate(path, size)
        diagnosed = write_error(path, error, f"{path.name} was left as it was")
        if diagnosed is None:
            raise
        raise diagnosed from error


def csv_text(rows, fields, header: bool = True) -> str:
    """``rows`` (dicts) as the CSV text ``csv.DictWriter`` writes (columns ``fields``, the header line unless not
    ``header``), for ``write_text`` or ``append_text``."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(fields))
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def reports_write_errors(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a command line's ``main``: an ``OutputWriteError`` raised anywhere in it prints ``error: <sentence>`` and
    returns exit status 1 (no traceback), as the commands' other refusals do."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except OutputWriteError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 1

    return wrapped
