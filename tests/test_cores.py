"""distill.core.cores: DataLoader workers and torch threads sized to the cores the process may use, and torch-fidelity's
command line (distill.eval.fidelity_cli) kept to them."""

import json
import os

import pytest
import torch

from distill.core import cores


@pytest.fixture
def two_cores(monkeypatch):
    """A process allowed cores 0 and 1 of a machine that reports 8."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.delenv(cores.WORKERS_ENV, raising=False)


def test_workers_leave_the_main_process_a_core(two_cores, monkeypatch):
    assert cores.usable_cores() == 2 and cores.loader_workers() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert cores.loader_workers() == 0  # one core: load in the main process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert cores.loader_workers() == 4 and cores.loader_workers(cap=8) == 8
    monkeypatch.delattr(os, "sched_getaffinity")  # no affinity call on this platform: the machine's count
    assert cores.usable_cores() == 8
    monkeypatch.setenv(cores.WORKERS_ENV, "0")
    assert cores.loader_workers() == 0
    monkeypatch.setenv(cores.WORKERS_ENV, "two")
    with pytest.raises(ValueError, match=r"DISTILL_NUM_WORKERS='two' is not a worker count; allowed: a non-negative integer"):
        cores.loader_workers()


def test_torch_threads_are_capped_not_raised(two_cores, monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert cores.cap_torch_threads() == 2
        torch.set_num_threads(1)
        assert cores.cap_torch_threads() == 1  # a caller's lower count stays
    finally:
        torch.set_num_threads(before)


def test_fidelity_cli_gives_its_loaders_the_usable_cores(two_cores, monkeypatch, tmp_path, capsys):
    """torch-fidelity asks for min(4, 2 x cpu_count()) = 4 workers on this 8-core machine; 2 usable cores allow 1."""
    import multiprocessing

    import torch_fidelity.utils as fidelity_utils
    from torch.utils.data import DataLoader

    from distill.eval.bench import save_png_folder
    from distill.eval.fidelity_cli import main as fidelity

    monkeypatch.setattr(multiprocessing, "cpu_count", lambda: 8)
    asked = []

    def recording_loader(*args, num_workers=0, **kwargs):
        asked.append(num_workers)
        return DataLoader(*args, num_workers=0, **kwargs)  # no processes in the test itself

    monkeypatch.setattr(fidelity_utils, "DataLoader", recording_loader)
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        save_png_folder(torch.rand(24, 1, 16, 16, generator=g) * 2 - 1, tmp_path / name)
    capsys.readouterr()
    fidelity(["--input1", str(tmp_path / "a"), "--input2", str(tmp_path / "b"), "--fid", "--feature-extractor",
              "mnist16-classifier", "--cpu", "--json", "--silent", "--no-cache"])
    assert json.loads(capsys.readouterr().out)["frechet_inception_distance"] >= 0
    assert asked == [1, 1]  # both folders' loaders
    assert fidelity_utils.DataLoader is recording_loader  # put back after the command
