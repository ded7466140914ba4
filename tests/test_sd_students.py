"""Prompt-conditioned (UNet2DConditionModel) students of the tiny Stable-Diffusion-style pipeline of
tests/conftest.py: the --diffusers export as a pipeline folder that stock diffusers samples exactly as
Student.sample does, and the refusal of cond=None."""

import shutil

import pytest
import torch
from conftest import tiny_sd_pipeline

from distill.export import save_student
from distill.run_config import StudentConfig
from students import build_student, load_student
from teachers import load_teacher

PROMPTS = ["the cat", "a red fox"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")[0]


def _perturbed_student(teacher, **student_options):
    student = build_student(StudentConfig(arch="teacher", sampling_grid="uniform", **student_options), teacher).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in student.net.parameters():  # a network unlike the teacher's (and a cond_proj away from zero)
            p.add_(0.02 * torch.randn_like(p))
    return student


@pytest.mark.parametrize("takes_w, sampler", [(True, "consistency"), (False, "ode")])
def test_prompt_student_pipeline_folder_samples_in_stock_diffusers_like_the_student(sd_folder, tmp_path, takes_w, sampler):
    """export --diffusers of a prompt student: LatentConsistencyModelPipeline (w through timestep_cond) or
    StableDiffusionPipeline (no w), loaded with DiffusionPipeline.from_pretrained, from the same latents, prompts and
    generator at 1, 2 and 3 steps. Max abs difference seen: 0 (the same float32 calls and arithmetic)."""
    from diffusers import DiffusionPipeline
    from test_distill_export import _export_cli

    teacher = load_teacher(sd_folder)
    parameterization = "consistency" if sampler == "consistency" else "denoiser"
    student = _perturbed_student(teacher, sampler=sampler, parameterization=parameterization)
    if takes_w:
        student.add_condition("w")
    save_student(student, tmp_path / "trained.safetensors")
    assert _export_cli()([str(tmp_path / "trained.safetensors"), "--out", str(tmp_path / "s.safetensors"),
                          "--diffusers", str(tmp_path / "pipe")]) == 0
    student = load_student(tmp_path / "s.safetensors").eval()
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    expected = "LatentConsistencyModelPipeline" if takes_w else "StableDiffusionPipeline"
    assert type(pipe).__name__ == expected and type(pipe.scheduler).__name__ == "FewStepScheduler"
    cond, w = teacher.encode_prompts(PROMPTS), 2.5
    for steps in (1, 2, 3):
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
        ours = student.sample(noise, steps, cond, generator=torch.Generator().manual_seed(1), **({"w": w} if takes_w else {}))
        theirs = pipe(PROMPTS, num_inference_steps=steps, latents=noise.clone(), guidance_scale=w if takes_w else 1.0,
                      generator=torch.Generator().manual_seed(1), output_type="latent").images
        diff = (ours - theirs).abs().max().item()
        print(f"{expected} {steps} steps: max abs difference {diff:.1e}")
        assert diff <= 1e-6, (steps, diff)
    images = pipe(PROMPTS, num_inference_steps=1, guidance_scale=w if takes_w else 1.0, output_type="pt").images
    assert images.shape == (2, 3, 16, 16)  # the copied VAE decodes


def test_prompt_student_export_needs_its_own_teacher_folder(sd_folder, tmp_path):
    from test_distill_export import _export_cli

    save_student(_perturbed_student(load_teacher(sd_folder)), tmp_path / "s.safetensors")
    other = tmp_path / "other"
    shutil.copytree(sd_folder, other)
    (other / "tokenizer" / "tokenizer_config.json").write_text((other / "tokenizer" / "tokenizer_config.json").read_text() + " ")
    args = [str(tmp_path / "s.safetensors"), "--out", str(tmp_path / "e.safetensors"), "--diffusers", str(tmp_path / "p")]
    assert _export_cli()([*args, "--teacher", str(other)]) == 1  # another teacher's text encoder / tokenizer / VAE
    assert _export_cli()([*args, "--teacher", str(tmp_path)]) == 1  # not a pipeline folder
    assert not (tmp_path / "e.safetensors").exists() and not (tmp_path / "p").exists()
    assert _export_cli()([*args, "--teacher", str(sd_folder)]) == 0
