"""Trainer robustness: SIGKILL and resume bit-identically, incomplete checkpoints, NaN guard, two ranks."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from distill_helpers import RING8, ROOT, TINY, run, same_tensors, subprocess_env, tensors, tiny_cfg

from distill.engine.checkpoint import complete_checkpoints
from distill.engine.train import NonFiniteError, check_world_size

SCRIPT = str(ROOT / "scripts" / "distill.py")


def _cli(out, *extra, steps=150):
    sets = [*TINY, f"max_steps={steps}", "checkpoint_every=10", "log_every=10"]
    return [sys.executable, SCRIPT, "--config", str(RING8), "--output-dir", str(out), "--set", *sets, *extra]


def test_sigkill_mid_training_then_resume_latest_is_bit_identical(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = subprocess.Popen(_cli(killed), env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-20").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()
    assert not (killed / "student.safetensors").exists()  # it really died mid-training
    # a checkpoint interrupted mid-write, and a folder without a manifest: both must be ignored
    (killed / "checkpoints" / "step-140.tmp").mkdir()
    (killed / "checkpoints" / "step-145").mkdir()
    resumed_from = complete_checkpoints(killed / "checkpoints")[-1]
    done = subprocess.run(_cli(killed, "--resume", "latest"), env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert f"resumed from {resumed_from}" in done.stdout
    assert run(tiny_cfg(full, "max_steps=150", "checkpoint_every=10", "log_every=10")) == full
    for name in ("student.safetensors", "student_ema.safetensors"):
        assert same_tensors(full / name, killed / name), name
    # the objective's EMA target, the optimizer and the random states are checkpointed too (tensors and JSON, no
    # pickle): the last checkpoints agree
    a, b = full / "checkpoints" / "step-150", killed / "checkpoints" / "step-150"
    for name in ("model", "optimizer", "ema", "helper.target"):
        assert same_tensors(a / f"{name}.safetensors", b / f"{name}.safetensors"), name
    assert (a / "optimizer.json").read_text() == (b / "optimizer.json").read_text()
    # torch's global generator (seeded by the run); Python's and NumPy's are the test process's own in the full run
    assert torch.equal(tensors(a / "rng_state_0.safetensors")["torch"], tensors(b / "rng_state_0.safetensors")["torch"])
    assert not list(a.rglob("*.pkl")) and not list(a.rglob("*.bin"))


def test_run_folder_with_checkpoints_needs_resume(tmp_path):
    run(tiny_cfg(tmp_path / "r", "max_steps=4"))
    with pytest.raises(ValueError, match="already has checkpoints; resume with --resume latest"):
        run(tiny_cfg(tmp_path / "r", "max_steps=8"))
    messages = []
    run(tiny_cfg(tmp_path / "r", "max_steps=8"), resume="latest", log=messages.append)
    assert any("resumed from" in m and "step-4" in m for m in messages)


def test_nan_loss_stops_with_step_and_network_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path / "nan", "debug_nan_step=6")
    with pytest.raises(NonFiniteError, match=r"non-finite loss \(nan\) at step 7 \(counted as in the log\) in network 'student'.*step-4"):
        run(cfg)
    assert [p.name for p in complete_checkpoints(tmp_path / "nan" / "checkpoints")] == ["step-4"]
    assert not (tmp_path / "nan" / "student.safetensors").exists()


def test_nan_gradient_is_caught_too(tmp_path, monkeypatch):
    from distill.objectives.consistency import ConsistencyDistillation

    original = ConsistencyDistillation.loss

    def loss_with_nan_gradient(self, name, nets, batch):  # finite value, NaN derivative: d sqrt(0 v) = 0 * inf
        value = original(self, name, nets, batch)
        return value + (0.0 * value).sqrt() if batch.step == 5 else value

    monkeypatch.setattr(ConsistencyDistillation, "loss", loss_with_nan_gradient)
    with pytest.raises(NonFiniteError, match=r"gradient norm .* at step 6 \(counted as in the log\) in network 'student'"):
        run(tiny_cfg(tmp_path / "nan_grad"))


def test_world_size_must_match_the_launch():
    check_world_size(2, {"WORLD_SIZE": "2"})
    with pytest.raises(RuntimeError, match="accelerate sees 1 process\\(es\\) but 2 were launched"):
        check_world_size(1, {"WORLD_SIZE": "2"})


def test_two_cpu_processes_run_and_finish(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           *_cli(out, steps=6)[1:]]
    env = {**subprocess_env(), "ACCELERATE_USE_CPU": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 of 2" in done.stdout and "rank 1 of 2" in done.stdout
    assert (out / "student.safetensors").is_file() and (out / "checkpoints" / "step-6" / "rng_state_1.safetensors").is_file()
    # the LR schedule counts global steps: the same learning rates as a one-process run of the same config
    # (accelerate steps a prepared scheduler once per process unless step_scheduler_with_optimizer=False)
    one = tmp_path / "one"
    single = subprocess.run(_cli(one, "optim.warmup_steps=20", "log_every=1", steps=6), env=subprocess_env(), capture_output=True)
    assert single.returncode == 0
    two = tmp_path / "two"
    cmd2 = [*cmd[: cmd.index("--output-dir") + 1], str(two), *cmd[cmd.index("--output-dir") + 2:], "optim.warmup_steps=20", "log_every=1"]
    assert subprocess.run(cmd2, env=env, capture_output=True, timeout=240).returncode == 0

    def lrs(run_dir):
        return [json.loads(line)["lr"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert lrs(two) == lrs(one) and len(set(lrs(one))) > 1
