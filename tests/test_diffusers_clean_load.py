"""Exported pipeline folders load with diffusers alone (issue #33): a fresh interpreter whose import path is the
standard library and site-packages only (``python -I -S``, no .pth files, so not this project's editable install)
loads each kind of ``save_diffusers`` folder with ``DiffusionPipeline.from_pretrained`` and samples it; the result
equals ``Student.sample`` on the same noise and generator. Also: a student refuses step counts its file does not record."""

import json
import site
import subprocess
import sys

import pytest
import torch
from conftest import save_teacher_folder, tiny_unet
from distill_helpers import tiny_cfg
from safetensors.torch import load_file

from students import build_student
from students.diffusers_export import save_diffusers
from teachers import load_teacher

SHAPE, LABELS, SEED = (3, 1, 8, 8), [0, 2, 1], 7
DDIM_GRID = [999.0, 749.0, 499.0, 249.0]  # DDIM's 4-step "trailing" grid of a 1000-step schedule

# Run in the clean interpreter: load every folder, sample every recorded step count, save the raw final samples.
CLEAN_SCRIPT = """
import json, sys
sys.path.append(sys.argv[1])
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file
for mod in ("students", "distill", "teachers"):
    try:
        __import__(mod)
        raise SystemExit(f"{mod} is importable: not a clean interpreter")
    except ImportError:
        pass
out, schedulers = {}, {}
for name, steps in json.loads(sys.argv[2]).items():
    pipe = DiffusionPipeline.from_pretrained(name, local_files_only=True, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    schedulers[name] = [type(pipe).__name__, type(pipe.scheduler).__name__]
    for k in steps:
        seen = []
        pipe(batch_size=3, num_inference_steps=k, class_labels=torch.tensor(%r), generator=torch.Generator().manual_seed(%d),
             callback=lambda i, t, x: seen.append(x.clone()), output_type="pt")
        out[f"{name}/{k}"] = seen[-1].contiguous()
save_file(out, "samples.safetensors")
print(json.dumps(schedulers))
""" % (LABELS, SEED)


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    from diffusers import DDPMScheduler

    return save_teacher_folder(tmp_path_factory.mktemp("teacher") / "t", tiny_unet(num_class_embeds=4),
                               DDPMScheduler(prediction_type="v_prediction"), teacher_json={"num_classes": 3, "null_class_label": 3})


def _student(teacher_folder, out, *overrides, grid=None):
    """A class-conditional copy of the tiny teacher, perturbed (not the random init only)."""
    cfg = tiny_cfg(out, f"teacher={teacher_folder}", "student.arch=teacher", "student.model={}", "student.class_conditional=true",
                   "student.sampling_grid=uniform", *overrides)
    student = build_student(cfg.student, load_teacher(teacher_folder)).eval()
    if grid is not None:  # as progressive distillation records its one grid
        student.sampling_steps, student.info["sampling_timesteps"] = (len(grid),), {str(len(grid)): grid}
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return student


def _clean_run(tmp_path, steps: dict) -> tuple[dict, dict]:
    site_packages = next(p for p in site.getsitepackages() if p.endswith("site-packages"))
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-I", "-S", "-c", CLEAN_SCRIPT, site_packages, json.dumps(steps)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), load_file(str(tmp_path / "samples.safetensors"))


def test_every_export_kind_loads_and_samples_like_the_student_in_a_clean_interpreter(teacher_folder, tmp_path):
    kinds = {  # folder -> (student, the scheduler class its folder names)
        "cd": (_student(teacher_folder, tmp_path / "r1", "student.sampler=consistency",
                        "student.parameterization=consistency"), "FewStepScheduler"),
        "cd_edm": (_student(teacher_folder, tmp_path / "r2", "student.sampler=consistency",
                            "student.parameterization=consistency_edm"), "FewStepScheduler"),
        # progressive's own grid (uniform in t, fractional times): no stock scheduler takes those steps
        "progressive": (_student(teacher_folder, tmp_path / "r3", "student.sampler=ode", "student.parameterization=denoiser",
                                 grid=[999.0, 749.25, 499.5, 249.75]), "FewStepScheduler"),
        "progressive_ddim": (_student(teacher_folder, tmp_path / "r4", "student.sampler=ode",
                                      "student.parameterization=denoiser", grid=DDIM_GRID), "DDIMScheduler"),
    }
    for name, (student, _) in kinds.items():
        save_diffusers(student, tmp_path / name)
    assert json.loads((tmp_path / "cd" / "model_index.json").read_text())["scheduler"] == ["fewstep_scheduler", "FewStepScheduler"]
    assert json.loads((tmp_path / "progressive_ddim" / "model_index.json").read_text())["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert not (tmp_path / "progressive_ddim" / "scheduler" / "fewstep_scheduler.py").exists()

    loaded, samples = _clean_run(tmp_path, {name: list(s.sampling_steps) for name, (s, _) in kinds.items()})
    labels = torch.tensor(LABELS)
    for name, (student, scheduler) in kinds.items():
        assert loaded[name] == ["ConsistencyModelPipeline", scheduler]
        for k in student.sampling_steps:
            g = torch.Generator().manual_seed(SEED)
            ours = student.sample(torch.randn(SHAPE, generator=g), k, cond=labels, generator=g)  # re-noising draws follow the noise
            diff = (samples[f"{name}/{k}"] - ours).abs().max().item()
            print(f"{name} {k} steps: max abs difference {diff:.1e}")
            assert diff <= 1e-5 * max(1.0, ours.abs().max().item()), (name, k, diff)


def test_a_student_refuses_a_step_count_its_file_does_not_record(teacher_folder, tmp_path):
    student = _student(teacher_folder, tmp_path / "r", "student.sampler=ode", "student.parameterization=denoiser",
                       grid=[999.0, 749.25, 499.5, 249.75])
    noise = torch.randn(SHAPE)
    with pytest.raises(ValueError, match=r"this student samples with 4 steps \(the step counts its file records\), not 2; "
                                         r"pass timesteps= to sample at other times"):
        student.sample(noise, 2, cond=torch.tensor(LABELS))
    assert student.sample(noise, 2, cond=torch.tensor(LABELS), timesteps=[999.0, 499.5]).shape == SHAPE
