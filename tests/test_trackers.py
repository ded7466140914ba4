"""Trackers (issue #33): a 2-process TensorBoard run ends with exit status 0, and a tracker whose package is not installed
is refused before any work in one sentence (accelerate itself only warns and runs on untracked)."""

import importlib.util
import subprocess
import sys

import pytest
from distill_helpers import RING8, ROOT, TINY, run, subprocess_env, tiny_cfg

from distill.engine.config import ConfigError


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_two_process_tensorboard_run_exits_0_with_its_event_files(tmp_path):
    """end_training destroys the process group: it must come after the last barrier, or rank 0 exits 1."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29593",
           str(ROOT / "scripts" / "distill.py"), "--config", str(RING8), "--output-dir", str(out),
           "--set", *TINY, "max_steps=4", "log_with=[tensorboard]"]
    done = subprocess.run(cmd, env={**subprocess_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1 of 2" in done.stdout and (out / "student.safetensors").is_file()
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))


def test_a_tracker_whose_package_is_missing_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not importable, whether or not wandb is installed here
    with pytest.raises(ConfigError) as e:
        run(tiny_cfg(tmp_path / "r", "log_with=[wandb]"))
    message = str(e.value)
    assert message.startswith("config key 'log_with' names 'wandb' but the wandb package is not installed (pip install wandb)")
    assert "allowed trackers, installed here:" in message and "wandb" not in message.split("installed here:")[1]
    if importlib.util.find_spec("tensorboard") is not None:
        assert message.endswith("installed here: tensorboard")
    assert not (tmp_path / "r").exists()  # refused before any work


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_cli_refuses_log_with_wandb_in_one_line(tmp_path, capsys):
    from conftest import load_script

    main = load_script("distill").main
    assert main(["--config", str(RING8), "--output-dir", str(tmp_path / "r"), "--set", *TINY, "log_with=[wandb]"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: config key 'log_with' names 'wandb' but the wandb package")
    assert not (tmp_path / "r").exists()


def test_an_unknown_tracker_name_is_refused_naming_accelerates_trackers(tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'log_with' names 'tensorbord'; allowed: .*tensorboard.*wandb"):
        run(tiny_cfg(tmp_path / "r", "log_with=[tensorbord]"))
