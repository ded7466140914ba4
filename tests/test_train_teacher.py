"""Teacher training smoke runs on a tiny UNet and a tiny MLP: save, reload, resume bit-identically. A teacher config
is a run config (``teacher: untrained``, the ``diffusion`` objective), read by the same loader as every other."""

import pytest
import torch
from safetensors.torch import load_file

from distill.engine.config import ConfigError, parse_overrides
from distill.engine.run_config import load_run_config
from teachers import load_teacher
from teachers.training import train

TINY_UNET = {"block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "UpBlock2D"], "layers_per_block": 1, "norm_num_groups": 4}


def _cfg(tmp_path, name, config="mnist16", **kw):
    base = {"student": {"model": TINY_UNET} if config == "mnist16" else {}, "batch_size": 8, "max_steps": 4,
            "checkpoint_every": 2, "optim": {"warmup_steps": 1}, "log_every": 1, "output_dir": str(tmp_path / name)}
    return load_run_config(f"configs/teachers/{config}.yaml", {**base, **kw})


def _weights(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_unet_teacher_trains_saves_reloads_and_resumes_bit_identically(tmp_path):
    from diffusers import DDPMPipeline

    full = train(_cfg(tmp_path, "full"), log=lambda m: None)
    teacher = load_teacher(full)
    assert teacher.num_classes == 10 and teacher.has_uncond and teacher.schedule.kind == "discrete_vp"
    x = teacher.denoise(torch.randn(2, 1, 16, 16), 500.0, torch.tensor([3, -1]))
    assert x.shape == (2, 1, 16, 16) and bool(torch.isfinite(x).all())
    assert DDPMPipeline.from_pretrained(full, local_files_only=True).unet.config.num_class_embeds == 11

    cfg = _cfg(tmp_path, "resumed")
    assert train(cfg, log=lambda m: None, stop_at=3) is None  # stops after checkpointing step 3
    (tmp_path / "resumed" / "checkpoints" / "step-4.tmp").mkdir()  # a checkpoint interrupted mid-write
    messages = []
    resumed = train(cfg, log=messages.append)
    assert any("resumed from" in m and "step-3" in m for m in messages)
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mlp_teacher_on_a_toy(tmp_path):
    cfg = _cfg(tmp_path, "mlp", "ring8_mlp", student={"model": {"hidden": 32, "layers": 1}}, batch_size=32)
    teacher = load_teacher(train(cfg, log=lambda m: None))
    assert teacher.data_shape == (2,) and teacher.num_classes == 0
    assert teacher.denoise(torch.randn(5, 2), 10.0).shape == (5, 2)


@pytest.mark.parametrize("overrides,message", [
    (["student.arch=mlp"], r"a teacher run \(teacher: untrained\) trains a diffusers folder: student.arch is 'mlp'; "
                           "allowed: unet, toy_mlp"),
    (["student.prediction_type=flow"], "student.prediction_type is 'flow'; allowed: epsilon, sample, v_prediction"),
    (["objective={name: consistency}"], "objective.name is 'consistency'; allowed: diffusion"),
    (["student.sampler=consistency"], "student.sampler is 'consistency'; allowed: ode"),
    (["objective.beta_schedule=cosine"], "config key 'objective.beta_schedule' is 'cosine'; allowed: null, linear, "),
    (["learning_rate=1e-3"], r"unknown config key\(s\) learning_rate; allowed under the top level: .*optim"),
    (["max_steps=0"], "config key 'max_steps' must be at least 1"),
])
def test_bad_configs_fail_before_any_work(tmp_path, overrides, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        train(load_run_config("configs/teachers/ring8_mlp.yaml", {**parse_overrides(overrides),
                                                                   "output_dir": str(tmp_path / "t")}))
    assert not (tmp_path / "t").exists()


def test_nested_set_overrides_merge_into_the_model_block():
    cfg = load_run_config("configs/teachers/ring8_mlp.yaml", parse_overrides(["student.model.hidden=32", "max_steps=7"]))
    assert cfg.student.model == {"hidden": 32, "layers": 3} and cfg.max_steps == 7


def test_schedule_options_are_refused_beside_a_trained_teacher(tmp_path):
    """objective.beta_schedule sets an untrained teacher's schedule; beside a teacher that has one it is refused."""
    from distill_helpers import RING8

    cfg = load_run_config(RING8, {"objective": {"name": "diffusion", "beta_schedule": "linear"}, "max_steps": 1,
                                  "student": {"parameterization": "denoiser"}, "output_dir": str(tmp_path / "d")})
    from distill.engine.train import train as train_run
    from students import build_student
    from teachers import load_teacher

    with pytest.raises(ValueError, match="set the schedule of a teacher trained from scratch .*teacher 'gmm:ring8' has its own"):
        train_run(cfg, load_teacher=load_teacher, build_student=build_student, log=lambda m: None)


def test_the_teacher_config_runs_through_distill_py_as_through_train_teacher(tmp_path):
    """One config system: scripts/distill.py takes a teacher config and writes the same teacher folder, bit for bit."""
    from conftest import load_script

    sets = ["student.model={hidden: 16, layers: 1}", "batch_size=16", "checkpoint_every=2"]
    for script in ("distill", "train_teacher"):
        argv = ["--config", "configs/teachers/ring8_mlp.yaml", "--output-dir", str(tmp_path / script), "--max-steps", "3"]
        assert load_script(script).main([*argv, "--set", *sets]) == 0
    a, b = (_weights(tmp_path / s / "teacher") for s in ("distill", "train_teacher"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_toy_mlp_teacher_folder_loads_in_stock_diffusers(tmp_path):
    from diffusers import DDPMPipeline

    folder = train(_cfg(tmp_path, "mlp", "ring8_mlp", student={"model": {"hidden": 16, "layers": 1}}, batch_size=16,
                        max_steps=2), log=lambda m: None)
    pipe = DDPMPipeline.from_pretrained(folder, local_files_only=True)
    assert type(pipe.unet).__name__ == "ToyMLP" and pipe.unet.config.dim == 2


def test_teacher_run_takes_the_launchers_precision_and_trackers(tmp_path):
    """The teacher config is a run of the main trainer: mixed_precision left null takes accelerate launch's
    --mixed_precision (it was pinned to 'no'), and log_with sends the scalars to accelerate's trackers."""
    import importlib.util
    import subprocess
    import sys

    import yaml
    from distill_helpers import ROOT, subprocess_env

    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard is not installed")
    out = tmp_path / "t"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--mixed_precision", "bf16",
           "--main_process_port", "29599", str(ROOT / "scripts" / "train_teacher.py"), "--config",
           str(ROOT / "configs" / "teachers" / "ring8_mlp.yaml"), "--output-dir", str(out), "--max-steps", "4",
           "--set", "student.model.hidden=16", "student.model.layers=1", "batch_size=16", "checkpoint_every=2", "log_every=2",
           "log_with=[tensorboard]"]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert yaml.safe_load((out / "config.yaml").read_text())["mixed_precision"] == "bf16"
    assert list((out / "tensorboard").rglob("events.out.tfevents.*")) and (out / "teacher" / "model_index.json").is_file()
