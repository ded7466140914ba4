"""Native to its ecosystem: DeepSpeed really runs, launches that start fewer processes than asked are named,
the launcher's mixed precision is honoured, trackers go through accelerate."""

import importlib.util
import json
import subprocess
import sys

import pytest
import yaml
from distill_helpers import RING8, ROOT, TINY, run, subprocess_env, tiny_cfg

from distill.engine.launch import launch_warning, requested_processes


def _launch(tmp_path, config: dict | None, *launch_args, sets=(), port=29571):
    args = list(launch_args)
    if config is not None:
        path = tmp_path / "accelerate.yaml"
        path.write_text(yaml.safe_dump(config))
        args = ["--config_file", str(path), *args]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *args, "--main_process_port", str(port),
           str(ROOT / "scripts" / "distill.py"), "--config", str(RING8), "--output-dir", str(tmp_path / "run"),
           "--set", *TINY, "max_steps=4", *sets]
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="the deepspeed extra is not installed")
@pytest.mark.parametrize("stage", ["zero1", "zero2"])
def test_deepspeed_runs_on_one_cpu_process_from_the_shipped_config(tmp_path, stage):
    config = yaml.safe_load((ROOT / "configs" / "accelerate" / f"deepspeed_{stage}.yaml").read_text())
    config.update(num_processes=1, mixed_precision="no")
    done = _launch(tmp_path, config, port=29571 + (stage == "zero2"))
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "step-4"
    # DeepSpeed's own engine checkpoint layout, not accelerate's plain optimizer.bin: it really ran DeepSpeed
    assert list(ckpt.glob("pytorch_model/*optim_states.pt")) and not (ckpt / "optimizer.bin").exists()
    assert (tmp_path / "run" / "student.safetensors").is_file()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] == r["grad_norm"] for r in rows)  # a number (DeepSpeed returns a float), not NaN


def test_launch_that_starts_fewer_processes_than_asked_is_named():
    assert requested_processes(["python", "accelerate", "launch", "--cpu", "--num_processes", "2", "x.py"]) == 2
    assert requested_processes(["/venv/bin/accelerate", "launch", "--num_processes=3", "x.py"]) == 3
    assert requested_processes(["python", "x.py", "--num_processes", "2"]) is None  # not a launcher line
    cfg = str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml")
    assert requested_processes(["accelerate", "launch", "--config_file", cfg, "x.py"]) == 2
    message = launch_warning(1, ["accelerate", "launch", "--cpu", "--num_processes", "2", "x.py"])
    assert "asked for 2 processes but accelerate started 1" in message and "cpu_2proc.yaml" in message
    assert launch_warning(2, ["accelerate", "launch", "--num_processes", "2", "x.py"]) is None


def test_plain_num_processes_2_on_cpu_warns(tmp_path):
    done = _launch(tmp_path, None, "--cpu", "--num_processes", "2", port=29575)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "the launch asked for 2 processes but accelerate started 1" in done.stdout


def test_launcher_mixed_precision_is_used_when_the_config_leaves_it_null(tmp_path):
    done = _launch(tmp_path, None, "--cpu", "--num_processes", "1", "--mixed_precision", "bf16", port=29576)
    assert done.returncode == 0, done.stderr[-2000:]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["mixed_precision"] == "bf16"


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_through_accelerate_trackers(tmp_path):
    run(tiny_cfg(tmp_path / "r", "log_with=[tensorboard]", "max_steps=4", "log_every=2"))
    events = list((tmp_path / "r" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("student/loss")] == [2, 4]


def _grey_imagefolder(root, size=20, per_class=6):
    """Two classes of small grey PNGs (an imagefolder layout): dark and bright squares, made here."""
    from PIL import Image

    for label, level in (("dark", 40), ("bright", 210)):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            img = Image.new("L", (size, size), level + 3 * i)
            img.save(root / label / f"{i}.png")
    return root


def test_grey_imagefolder_trains_a_16x16x1_teacher_and_is_distilled(tmp_path):
    from conftest import load_script

    folder = _grey_imagefolder(tmp_path / "digits")
    unet = "{block_out_channels: [8, 16], down_block_types: [DownBlock2D, DownBlock2D], up_block_types: [UpBlock2D, UpBlock2D], " \
           "layers_per_block: 1, norm_num_groups: 4}"
    teacher_main = load_script("train_teacher").main
    assert teacher_main(["--config", str(ROOT / "configs" / "teachers" / "mnist16.yaml"), "--output-dir", str(tmp_path / "t"),
                         "--set", f"dataset=hf:{folder}", "dataset_options={resolution: 16, channels: 1}", f"student.model={unet}",
                         "batch_size=4", "max_steps=2", "checkpoint_every=2", "optim.warmup_steps=1"]) == 0
    teacher = tmp_path / "t" / "teacher"
    from teachers import load_teacher

    t = load_teacher(teacher)
    assert t.data_shape == (1, 16, 16) and t.num_classes == 2
    distill = load_script("distill").main
    cd = str(ROOT / "configs" / "distill" / "cd_mnist16.yaml")
    sets = [f"teacher={teacher}", f"dataset=hf:{folder}", "batch_size=4", "checkpoint_every=2", "objective.num_scales=4"]
    assert distill(["--config", cd, "--output-dir", str(tmp_path / "d"), "--max-steps", "2", "--set", *sets]) == 0  # shape from the teacher
    assert (tmp_path / "d" / "student.safetensors").is_file()
    assert distill(["--config", cd, "--output-dir", str(tmp_path / "bad"), "--max-steps", "2", "--set", *sets,
                    "dataset_options={resolution: 8}"]) == 1
    assert not (tmp_path / "bad").exists()
