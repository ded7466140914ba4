"""One writer per output folder (issue #32, distill.engine.lock): two real processes aimed at one folder, for a
distillation and for a bench. The first one is stopped (SIGSTOP) while it holds the lock, so the second meets it
mid-write every time; the second must stop with one sentence and exit status 2, changing nothing, and the first must
then finish with its own outputs intact."""

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from distill_helpers import RING8, ROOT, TINY, run, subprocess_env, tiny_cfg

from distill.engine.lock import LOCK_FILE, FolderInUse, FolderLock, launched_rank

# a process that takes a folder's lock, says so, and keeps it until it is killed
HOLD = ("import sys, time; from distill.engine.lock import FolderLock; FolderLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(300)")


def snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def in_use(folder: Path, pid: int) -> str:
    return f"error: {folder} is in use by another process (pid {pid}); wait for it or choose another output folder"


def start(script: str, args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:  # a file, not a pipe: a stopped reader can never block the writer
        return subprocess.Popen([sys.executable, str(ROOT / "scripts" / f"{script}.py"), *args], env=subprocess_env(),
                                stdout=f, stderr=subprocess.STDOUT)


def stop_once_locked(proc: subprocess.Popen, folder: Path, log: Path, timeout: float = 240) -> None:
    """SIGSTOP ``proc`` as soon as it holds ``folder``'s lock (its pid in the lock file); it keeps the lock stopped."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        lock = folder / LOCK_FILE
        if lock.is_file() and lock.read_text().strip() == str(proc.pid):
            proc.send_signal(signal.SIGSTOP)
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the first process ended before it could be stopped mid-write:\n{log.read_text()[-3000:]}"


def second(script: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), *args], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


def test_the_lock_is_one_processes_and_goes_when_that_process_dies(tmp_path):
    folder = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUse, match=rf"^{folder} is in use by another process \(pid {holder.pid}\); wait for it"):
            FolderLock(folder).acquire()
        FolderLock(folder, enabled=False).acquire()  # a rank other than 0 takes no lock
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs, the kernel drops the lock
        holder.wait()
    with FolderLock(folder) as lock:
        assert lock.acquire_existing().held and (folder / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert not lock.held and (folder / LOCK_FILE).read_text() == f"{holder.pid}\n"  # locked, never written: as it was
    with FolderLock(folder) as lock:
        lock.acquire_existing().acquire()
    assert (folder / LOCK_FILE).read_text() == f"{os.getpid()}\n"  # written under the lock: this process's pid stays
    FolderLock(tmp_path / "new").acquire_existing()
    assert not (tmp_path / "new").exists()  # no lock file yet: nothing to take, nothing made
    assert launched_rank({}) == 0 and launched_rank({"RANK": "1"}) == 1


def test_a_second_distillation_into_a_run_folder_in_use_is_refused_and_changes_nothing(tmp_path):
    out, log = tmp_path / "run", tmp_path / "first.log"
    cli = ["--config", str(RING8), "--output-dir", str(out), "--set", *TINY]
    first = start("distill", [*cli, "max_steps=300", "checkpoint_every=100", "log_every=10"], log)
    stop_once_locked(first, out, log)
    try:
        before = snapshot(out)
        done = second("distill", [*cli, "max_steps=40", "seed=7"])
        assert done.returncode == 2, done.stderr[-3000:]
        assert done.stderr.strip().splitlines()[-1] == in_use(out, first.pid)
        assert snapshot(out) == before  # nothing written, nothing read-and-rewritten
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 0 and (out / "student.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(10, 301, 10))  # the first run's rows only, in order


def test_a_run_that_finds_its_new_folder_taken_during_setup_is_refused(tmp_path):
    """The other path: the folder did not exist when the run started, so it is locked only before the first write, and
    another process took it in the meantime (here: while the teacher loads)."""
    from distill.engine.train import train
    from students import build_student
    from teachers import load_teacher

    out, holder = tmp_path / "run", []

    def load_teacher_while_another_takes_the_folder(spec):
        holder.append(subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=subprocess_env(), stdout=subprocess.PIPE, text=True))
        assert holder[0].stdout.readline().strip() == "held"
        return load_teacher(spec)

    try:
        with pytest.raises(FolderInUse) as refused:
            train(tiny_cfg(out, "max_steps=4"), load_teacher=load_teacher_while_another_takes_the_folder,
                  build_student=build_student, log=lambda m: None)
        assert str(refused.value) == in_use(out, holder[0].pid)[len("error: "):]
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # no config.yaml, metrics or checkpoint
    finally:
        for proc in holder:
            proc.kill()
            proc.wait()
    run(tiny_cfg(out, "max_steps=4"))  # the holder is gone: the folder is free again
    assert (out / "student.safetensors").is_file()


def test_a_second_bench_into_an_out_in_use_is_refused_and_changes_nothing(tmp_path):
    out, log = tmp_path / "bench", tmp_path / "first.log"
    common = ["--teacher", "gmm:ring8", "--num-samples", "1000", "--out", str(out)]
    first = start("bench", [*common, "--solvers", "euler,dpmpp_2m", "--nfe", "2,4,8,16"], log)
    stop_once_locked(first, out, log)
    try:
        before = snapshot(out)
        done = second("bench", [*common, "--solvers", "euler", "--nfe", "3"])
        assert done.returncode == 2, done.stderr[-3000:]
        assert done.stderr.strip().splitlines()[-1] == in_use(out, first.pid)
        assert snapshot(out) == before
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
    with open(out / "fid_vs_nfe.csv", newline="") as f:
        cells = [(r["method"], int(r["nfe"])) for r in csv.DictReader(f) if r["kind"] == "solver"]
    assert sorted(cells) == sorted((s, n) for s in ("euler", "dpmpp_2m") for n in (2, 4, 8, 16))  # all the first's, only
    assert (out / "commands.txt").read_text().count("scripts/bench.py") == 1  # the second command was not even logged
