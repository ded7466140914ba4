"""A full disk and read-only folders mid-run (issue #32): every command stops with one sentence naming the file and the
cause, leaves no temporary file, keeps every file written before, and a distillation resumed once there is room again
ends bit-identical to one that never stopped. Faults are injected where the bytes are written (safetensors'
``save_file``, ``os.write``, ``open``); one real full tmpfs when this process may mount one."""

import errno
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import load_script
from distill_helpers import RING8, TINY, same_tensors
from safetensors import SafetensorError

from distill.core import atomic
from distill.core.atomic import OutputWriteError, file_mode, write_bytes, write_folder, write_text, write_with
from distill.engine.checkpoint import checkpoint_problem, complete_checkpoints
from distill.engine.export import save_student
from distill.engine.run_config import StudentConfig
from distill.engine.run_files import METRICS_FILE
from students import build_student
from teachers import load_teacher

REAL_SAVE_FILE = safetensors.torch.save_file
NO_SPACE = "no space left on the device (errno ENOSPC)"


def snapshot(root: Path, skip: str = "\0") -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path, those whose path contains ``skip`` left out."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and skip not in p.as_posix()}


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")]


def last_line(err: str) -> str:
    """The last line the command printed on stderr (a progress bar ends its lines with carriage returns)."""
    assert "Traceback" not in err, err
    return err.replace("\r", "\n").strip().splitlines()[-1]


def disk_full_save_file(monkeypatch, fail_on, before_failing=lambda: None):
    """safetensors' ``save_file`` writes half the file, then raises what safetensors raises on a full disk, on the
    calls for which ``fail_on(path)`` is true; ``before_failing()`` runs first (a snapshot of what was written)."""

    def save_file(tensors, filename, metadata=None):
        if not fail_on(Path(filename)):
            return REAL_SAVE_FILE(tensors, filename, metadata=metadata)
        before_failing()
        REAL_SAVE_FILE(tensors, filename, metadata=metadata)
        os.truncate(filename, os.path.getsize(filename) // 2)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def distill_argv(out: Path, *extra: str) -> list[str]:
    return ["--config", str(RING8), "--output-dir", str(out), "--set", *TINY, *extra]


@pytest.fixture(scope="module")
def distill_main():
    return load_script("distill").main


@pytest.fixture(scope="module")
def uninterrupted(distill_main, tmp_path_factory):
    """The tiny distillation (12 steps, checkpoints every 4) run without a fault."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert distill_main(distill_argv(out)) == 0
    return out


def assert_same_result(a: Path, b: Path) -> None:
    for name in ("student.safetensors", "student_ema.safetensors", "networks.safetensors"):
        assert same_tensors(a / name, b / name), name


# -- (1) + (2): faults injected where the bytes are written ------------------------------------------------------------
def test_distill_disk_full_mid_checkpoint_keeps_the_last_one_and_resumes_bit_identical(distill_main, uninterrupted,
                                                                                       tmp_path, monkeypatch, capsys):
    out, seen, written = tmp_path / "run", [], {}

    def fail_on(path: Path) -> bool:  # the third file of checkpoint step-8: partway through it
        seen.extend([path] if "step-8.tmp" in path.as_posix() else [])
        return len(seen) == 3 and path == seen[-1]

    disk_full_save_file(monkeypatch, fail_on, lambda: written.update(snapshot(out, skip="step-8.tmp")))
    assert distill_main(distill_argv(out)) == 1
    assert last_line(capsys.readouterr().err) == (f"error: could not write {out / 'checkpoints' / 'step-8'}: {NO_SPACE}; the "
                                                  f"checkpoints already written (step-4) were left as they were")
    assert not temp_files(out) and not (out / "checkpoints" / "step-8").exists()
    assert written and snapshot(out) == written  # the previous checkpoint, config.yaml, metrics.jsonl: untouched
    assert checkpoint_problem(out / "checkpoints" / "step-4") is None

    monkeypatch.undo()  # space freed
    assert distill_main(distill_argv(out, "--resume", "latest")) == 0
    assert "resumed from" in capsys.readouterr().out
    assert_same_result(uninterrupted, out)


def test_export_disk_full_keeps_the_student_file_already_there(tmp_path, monkeypatch, capsys):
    teacher = load_teacher("gmm:aniso2d")
    sources = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        student = build_student(StudentConfig(arch="mlp", model={"hidden": 16, "layers": 1}), teacher)
        sources.append(save_student(student, tmp_path / f"source{seed}.safetensors"))
    export, out = load_script("export").main, tmp_path / "exported" / "student.safetensors"
    assert export([str(sources[0]), "--out", str(out)]) == 0
    before = snapshot(out.parent)

    disk_full_save_file(monkeypatch, lambda path: path.parent == out.parent)
    assert export([str(sources[1]), "--out", str(out)]) == 1
    assert last_line(capsys.readouterr().err) == f"error: could not write {out}: {NO_SPACE}; nothing was changed"
    assert snapshot(out.parent) == before and not temp_files(tmp_path)


def test_make_trajectories_disk_full_keeps_the_shards_written_and_finishes_later(tmp_path, monkeypatch, capsys):
    make, out, written = load_script("make_trajectories").main, tmp_path / "cache", {}
    argv = ["--teacher", "gmm:ring8", "--solver", "euler", "--nfe", "2", "--num-samples", "8", "--shard-size", "4",
            "--out", str(out)]
    disk_full_save_file(monkeypatch, lambda path: "shard-00001" in path.name, lambda: written.update(snapshot(out, skip=".tmp")))
    assert make(argv) == 1
    shard = out / "shard-00001.safetensors"
    assert last_line(capsys.readouterr().err) == f"error: could not write {shard}: {NO_SPACE}; nothing was changed"
    assert sorted(written) == ["manifest.json", "shard-00000.safetensors"] and snapshot(out) == written and not temp_files(out)

    monkeypatch.undo()
    assert make(argv) == 0
    after = snapshot(out)  # the shard written before is untouched; the manifest now also records shard 1 (and its hash)
    assert after["shard-00000.safetensors"] == written["shard-00000.safetensors"] and "shard-00001.safetensors" in after
    manifest = json.loads((out / "manifest.json").read_text())
    hashes = manifest["shard_sha256"]
    assert sorted(hashes) == ["0", "1"], manifest
    assert hashes["0"] == hashlib.sha256((out / "shard-00000.safetensors").read_bytes()).hexdigest()


def test_run_cost_disk_full_keeps_the_cost_file_already_there(tmp_path, monkeypatch, capsys):
    from test_run_cost import fake_run

    run = fake_run(tmp_path / "run", [(10, "student", 0.5)])
    out = tmp_path / "student.cost.json"
    out.write_text('{"steps": 1}\n')
    real_write = os.write

    def write(fd, data):  # half of the bytes reach the file, then the disk is full
        if fd <= 2:
            return real_write(fd, data)
        real_write(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)
    code = load_script("run_cost").main([str(run), "--hardware", "cpu", "--teacher-nfe-per-step", "1", "--out", str(out)])
    monkeypatch.undo()
    assert code not in (0, None)
    assert last_line(capsys.readouterr().err) == f"error: could not write {out}: {NO_SPACE}; nothing was changed"
    assert out.read_text() == '{"steps": 1}\n' and not temp_files(tmp_path)


# -- (4): the run folder made read-only mid-run ------------------------------------------------------------------------
def test_metrics_folder_made_read_only_mid_run_stops_with_a_sentence_and_resumes(distill_main, uninterrupted, tmp_path,
                                                                                 monkeypatch, capsys):
    out, written, real_open = tmp_path / "run", {}, open
    as_root = os.geteuid() == 0  # root ignores permissions: the read-only file system is simulated

    def read_only_open(file, mode="r", *args, **kwargs):
        path = Path(file)
        if path.name == METRICS_FILE and "a" in mode and (out / "checkpoints" / "step-4").is_dir() and not written:
            written.update(snapshot(out))
            if as_root:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            os.chmod(path, 0o444)
            os.chmod(out, 0o555)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(atomic, "open", read_only_open, raising=False)
    try:
        assert distill_main(distill_argv(out)) == 1
    finally:
        os.chmod(out, 0o755)
        os.chmod(out / METRICS_FILE, 0o644)
    cause = "the file system is read-only (errno EROFS)" if as_root else "permission denied (errno EACCES)"
    assert last_line(capsys.readouterr().err) == (f"error: could not write {out / METRICS_FILE}: {cause}; {METRICS_FILE} was "
                                                  f"left as it was")
    assert written and snapshot(out) == written and not temp_files(out)

    monkeypatch.undo()
    assert distill_main(distill_argv(out, "--resume", "latest")) == 0
    assert_same_result(uninterrupted, out)


def test_append_that_fills_the_disk_cuts_the_file_back(tmp_path, monkeypatch):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 2}\n')

    class HalfWritten:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:len(text) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic, "open", lambda file, mode="r": HalfWritten(open(file, mode)), raising=False)
    with pytest.raises(OutputWriteError, match=rf"could not write .*{METRICS_FILE}: no space left on the device"):
        atomic.append_text(path, '{"step": 4, "loss": 0.5}\n')
    assert path.read_text() == '{"step": 2}\n'


# -- (3): a real full disk ---------------------------------------------------------------------------------------------
def _mount_tmpfs(folder: Path, kilobytes: int, remount: bool = False) -> bool:
    options = f"remount,size={kilobytes}k" if remount else f"size={kilobytes}k"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def _pages(folder: Path) -> int:
    """Bytes ``folder``'s files take on a tmpfs (whole 4 KiB pages)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())


def test_real_full_tmpfs_mid_distillation(distill_main, uninterrupted, tmp_path, capsys):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    checkpoint = _pages(uninterrupted / "checkpoints" / "step-12")
    # room for two checkpoints and the run's files, not for a third one beside them (written before the oldest goes)
    size_kb = (int(2.4 * checkpoint) + 32 * 1024) // 1024
    if not _mount_tmpfs(disk, size_kb):
        pytest.skip("this process cannot mount a tmpfs")
    try:
        out = disk / "run"
        assert distill_main(distill_argv(out)) == 1
        line = last_line(capsys.readouterr().err)
        assert line.startswith(f"error: could not write {out}/") and NO_SPACE in line, line
        assert not temp_files(out) and not (out / "student.safetensors").exists()
        kept = complete_checkpoints(out / "checkpoints")
        assert [p.name for p in kept] == ["step-4", "step-8"]
        assert all(checkpoint_problem(p) is None for p in kept)
        reference = uninterrupted / "checkpoints" / "step-8"
        for name in ("model.safetensors", "optimizer.safetensors", "ema.safetensors", "rng_state_0.safetensors"):
            assert (kept[-1] / name).read_bytes() == (reference / name).read_bytes(), name

        # still full and now read-only too: a resume refuses with one sentence before it writes anything
        if subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True).returncode == 0:
            before = snapshot(out)
            assert distill_main(distill_argv(out, "--resume", "latest")) == 1
            line = last_line(capsys.readouterr().err)  # the output folder check or the lock names the folder
            assert line.startswith("error: ") and str(out) in line and "read-only" in line, line
            assert snapshot(out) == before
            assert subprocess.run(["mount", "-o", "remount,rw", str(disk)], capture_output=True).returncode == 0

        assert _mount_tmpfs(disk, 4 * size_kb, remount=True)  # space freed
        assert distill_main(distill_argv(out, "--resume", "latest")) == 0
        assert_same_result(uninterrupted, out)
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# -- (5): the helper itself ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_umask_mode(tmp_path, umask):
    previous = os.umask(umask)
    try:
        assert file_mode() == 0o666 & ~umask
        paths = [write_text(tmp_path / "a.json", "{}\n"), write_bytes(tmp_path / "b.bin", b"\0" * 10),
                 write_with(tmp_path / "c.safetensors", lambda tmp: REAL_SAVE_FILE({"x": torch.zeros(2)}, str(tmp))),
                 write_folder(tmp_path / "d", lambda tmp: REAL_SAVE_FILE({"x": torch.zeros(2)}, str(tmp / "e.safetensors")))
                 / "e.safetensors"]
    finally:
        os.umask(previous)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in paths} == {p.name: oct(0o666 & ~umask) for p in paths}


def test_failed_writes_leave_the_old_file_and_folder(tmp_path, monkeypatch):
    path, folder = write_text(tmp_path / "x.json", "old\n"), tmp_path / "pipeline"
    write_folder(folder, lambda tmp: (tmp / "model_index.json").write_text("old\n"))
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp" in Path(src).name:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputWriteError, match=r"x\.json: the file system is read-only \(errno EROFS\); nothing was changed"):
        write_text(path, "new\n")
    with pytest.raises(OutputWriteError, match=r"pipeline: the file system is read-only \(errno EROFS\)"):
        write_folder(folder, lambda tmp: (tmp / "model_index.json").write_text("new\n"))
    monkeypatch.undo()
    assert path.read_text() == "old\n" and (folder / "model_index.json").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline", "x.json"]


def test_an_error_that_is_not_about_the_disk_propagates_unchanged(tmp_path):
    def fail(tmp):
        raise KeyError("not a write error")

    with pytest.raises(KeyError):
        write_with(tmp_path / "x.safetensors", fail)
    assert not list(tmp_path.iterdir())


def test_an_error_about_a_file_being_read_propagates_unchanged(tmp_path):
    def fill(tmp):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/nonexistent/teacher/vae")

    with pytest.raises(FileNotFoundError):
        write_folder(tmp_path / "pipeline", fill)
    assert not list(tmp_path.iterdir())


def test_a_run_folder_locked_read_only_is_refused_with_a_sentence(tmp_path, monkeypatch):
    from distill.engine.lock import LOCK_FILE, FolderLock

    (tmp_path / LOCK_FILE).write_text("")
    real_open = os.open

    def read_only_open(path, flags, *args):
        if Path(path).name == LOCK_FILE and flags & os.O_RDWR:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only_open)
    with pytest.raises(OutputWriteError, match=rf"could not write {tmp_path / LOCK_FILE}: the file system is read-only"):
        FolderLock(tmp_path).acquire_existing()
