"""Prompt-conditioned (UNet2DConditionModel) students of the tiny Stable-Diffusion-style pipeline of
tests/conftest.py: the --diffusers export as a pipeline folder that stock diffusers samples exactly as
Student.sample does, and the refusal of cond=None."""

import json
import shutil

import pytest
import torch
from conftest import tiny_sd_pipeline

from distill.engine.export import save_student
from distill.engine.run_config import StudentConfig
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
def test_prompt_student_pipeline_folder_samples_in_stock_diffusers_like_the_student(sd_folder, tmp_path, takes_w, sampler,
                                                                                    remote_code_cache):
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
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True, trust_remote_code=True)
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


def _pairs(root):
    from test_sd_teacher import _pairs_folder

    return root if root.exists() else _pairs_folder(root)


def _prompt_file(root):
    root.mkdir(exist_ok=True)
    (root / "p.txt").write_text("the cat\na red fox\nthe sea\na dog\n")
    return f"prompts:{root / 'p.txt'}"


@pytest.fixture(scope="module")
def sd_v_folder(tmp_path_factory):
    """The tiny pipeline with a v-prediction scheduler (SD 2.x's): progressive distillation refuses eps students."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    return tiny_sd_pipeline(tmp_path_factory.mktemp("sd_v") / "pipe", scheduler)[0]


def _prompt_cache(teacher_folder, root):
    """Teacher ODE pairs on the tiny pipeline, prompts stored by reference (4 DDIM steps, guided; the script)."""
    from conftest import load_script

    if not (root / "manifest.json").exists():
        assert load_script("make_trajectories").main([
            "--teacher", str(teacher_folder), "--solver", "euler", "--nfe", "4", "--num-samples", "6", "--shard-size", "4",
            "--grid", "uniform", "--final", "clean", "--guidance-scale", "2", "--prompts",
            _prompt_file(root.parent / "prompts"), "--out", str(root)]) == 0
    return root


# objective -> (config, overrides); every run: batch 2, 3 steps, checkpoints every step, no EMA
OBJECTIVES = {
    "progressive": ("progressive_ring8.yaml", lambda d: [
        "teacher=V", f"dataset=hf:{_pairs(d / 'pairs')}", "dataset_options={text_column: text}", "student.arch=teacher",
        "student.model={}", "student.sampling_grid=uniform", "objective.student_steps=2", "objective.grid=uniform",
        "objective.parameterization=v"]),
    "reflow": ("reflow_ring8.yaml", lambda d: [
        f"trajectories={_prompt_cache(d.parent / 'sd_eps', d / 'cache')}", "student.arch=teacher", "student.model={}",
        "objective.label_dropout=0.5"]),
    "slam": ("cd_sd15.yaml", lambda d: [
        f"dataset=hf:{_pairs(d / 'pairs')}", "objective.name=slam", "objective.gamma_min=0.5", "objective.num_scales=6",
        "objective.guidance_range=[1.5, 3.0]"]),
    "dmd2_gan": ("dmd2_mnist16.yaml", lambda d: [
        f"dataset=hf:{_pairs(d / 'pairs')}", "dataset_options={text_column: text}", "student.class_conditional=false",
        "objective.critic_steps=2", "objective.guidance_scale=2.0", "objective.gan_t_range=[0.1, 0.9]"]),
    "sid": ("sid_mnist16.yaml", lambda d: [
        f"dataset={_prompt_file(d / 'prompts')}", "student.class_conditional=false", "objective.guidance_scale=2.0"]),
}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_objective_families_on_the_tiny_pipeline_resume_bit_identically_and_export(sd_folder, sd_v_folder, tmp_path_factory,
                                                                                    objective, remote_code_cache):
    """One objective of each family on prompt conditioning: progressive (a v-prediction teacher, DDIM student), reflow
    (a trajectory cache with prompts by reference, label dropout to the empty prompt), SLAM (w and gamma inputs),
    DMD2 with its GAN head on the fake score's UNet2DConditionModel bottleneck, data-free SiD from a prompt file. Each
    runs 3 steps, resumes from its step-1 checkpoint bit-identically and exports as a stock diffusers folder that samples
    like the student (SLAM's gamma folded in at its sampling value 1: equal up to float32 rounding)."""
    from distill_helpers import ROOT, run, same_tensors
    from test_distill_export import _export_cli

    from distill.engine.config import parse_overrides
    from distill.engine.run_config import load_run_config

    shared = tmp_path_factory.getbasetemp() / "sd_objectives"
    shared.mkdir(exist_ok=True)
    if not (shared.parent / "sd_eps").exists():
        shutil.copytree(sd_folder, shared.parent / "sd_eps")
    work = tmp_path_factory.mktemp(objective)
    config, overrides = OBJECTIVES[objective]
    teacher = sd_v_folder if objective == "progressive" else shared.parent / "sd_eps"
    base = [f"teacher={teacher}", *[o for o in overrides(shared) if not o.startswith("teacher=")], "batch_size=2",
            "max_steps=3", "checkpoint_every=1", "log_every=1", "ema_decay=null", "optim.lr=1e-3", "optim.warmup_steps=0"]
    cfg = lambda out, *more: load_run_config(ROOT / "configs" / "distill" / config,  # noqa: E731
                                             parse_overrides([*base, *more, f"output_dir={out}"]))
    run(cfg(work / "full"))
    run(cfg(work / "cut", "max_steps=1"))
    run(cfg(work / "cut"), resume="latest")
    assert same_tensors(work / "full" / "student.safetensors", work / "cut" / "student.safetensors")
    if objective == "dmd2_gan":  # the GAN terms are on: generator and discriminator losses are logged
        rows = [json.loads(line) for line in (work / "full" / "metrics.jsonl").read_text().splitlines()]
        assert any("gan_g" in r for r in rows) and any("gan_d" in r for r in rows)
    if objective == "reflow":  # the cache holds prompt indices in the seeded order, no embeddings
        from distill.data import load_dataset
        from distill.engine.trajectories import TrajectoryCache

        cache = TrajectoryCache(shared / "cache")
        rows = cache.rows(range(6))
        assert set(rows) == {"noise", "states", "sample", "label"} and rows["label"].dtype == torch.int64
        assert cache.prompt_texts(rows["label"]) == load_dataset(cache.manifest["prompts"]).ordered(0, 6)
    student = load_student(work / "full" / "student.safetensors")
    assert student.info["conditioning"] == "prompts" and type(student.net).__name__ == "UNet2DConditionModel"
    start = build_student(StudentConfig(arch="teacher"), load_teacher(teacher))
    assert any(not torch.equal(v, start.net.state_dict()[k]) for k, v in student.net.state_dict().items())  # trained
    if objective == "slam":  # a gamma embedding trained away from zero: folding it into the bias changes the UNet
        assert student.conditions["gamma"].proj.weight.abs().max() > 0
    assert _export_cli()([str(work / "full"), "--out", str(work / "s.safetensors"), "--diffusers", str(work / "pipe")]) == 0
    _check_pipeline_samples_like_the_student(work / "pipe", load_student(work / "s.safetensors").eval(), teacher)


def _check_pipeline_samples_like_the_student(folder, student, teacher_folder):
    """The stock pipeline in ``folder`` against ``Student.sample`` at the student's first recorded step count."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    takes_w, steps = "w" in student.conditions, student.sampling_steps[0]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ours = student.sample(noise, steps, load_teacher(teacher_folder).encode_prompts(PROMPTS),
                          generator=torch.Generator().manual_seed(1), **({"w": 2.0} if takes_w else {}))
    theirs = pipe(PROMPTS, num_inference_steps=steps, latents=noise.clone(), guidance_scale=2.0 if takes_w else 1.0,
                  generator=torch.Generator().manual_seed(1), output_type="latent").images
    print(f"{type(pipe).__name__} {steps} steps: max abs difference {(ours - theirs).abs().max():.1e}")
    assert (ours - theirs).abs().max() <= 1e-5 * (1 + ours.abs().max()), (ours - theirs).abs().max()


def test_prompt_student_refuses_cond_none_with_one_sentence(sd_folder):
    student = build_student(StudentConfig(arch="teacher"), load_teacher(sd_folder)).eval()
    with pytest.raises(ValueError, match=r"is prompt-conditioned: pass cond=teacher.encode_prompts\(\[...\]\), one prompt "
                                         r"per sample, not None$"):
        student.sample(torch.randn(2, 4, 8, 8), 1)
    with pytest.raises(ValueError, match="prompt-conditioned: .* not Tensor"):
        student.sample(torch.randn(2, 4, 8, 8), 1, torch.tensor([0, 1]))


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change: start and leave it blank."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("offload", [False, True])
def test_teacher_in_bf16_under_mixed_precision_and_offloaded_encoders(sd_folder, tmp_path, offload, fresh_accelerate_state):
    """mixed_precision bf16 on the CPU: the frozen UNet (and, unless offloaded, the text encoder and VAE) is cast once
    to bf16 after the student was copied from the float32 weights; LCM-style CD steps run and stay finite."""
    from distill_helpers import ROOT

    from distill.engine.config import parse_overrides
    from distill.engine.run_config import load_run_config
    from distill.engine.train import train

    loaded = []

    def keep(spec):
        loaded.append(load_teacher(spec))
        return loaded[-1]

    overrides = [f"teacher={sd_folder}", f"dataset=hf:{_pairs(tmp_path / 'pairs')}", "objective.num_scales=6",
                 "objective.guidance_range=[1.5, 3.0]", "batch_size=2", "max_steps=2", "checkpoint_every=2", "log_every=1",
                 "mixed_precision=bf16", f"teacher_offload={str(offload).lower()}", f"output_dir={tmp_path / 'r'}"]
    train(load_run_config(ROOT / "configs" / "distill" / "cd_sd15.yaml", parse_overrides(overrides)), load_teacher=keep,
          build_student=build_student, log=lambda m: None)
    teacher = loaded[0]
    encoders = torch.float32 if offload else torch.bfloat16
    assert teacher.unet.dtype == torch.bfloat16
    assert teacher.text_encoder.dtype == encoders and teacher.vae.dtype == encoders
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    student = load_student(tmp_path / "r" / "student.safetensors")
    assert next(student.net.parameters()).dtype == torch.float32
    fp32 = load_teacher(sd_folder)
    start = build_student(StudentConfig(arch="teacher"), fp32)  # the student started from the float32 weights
    assert any(not torch.equal(v, v.bfloat16().float()) for v in start.net.state_dict().values())
    seen = []
    teacher.unet.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    teacher.denoise(torch.randn(1, 4, 8, 8), 999.0, teacher.encode_prompts(["the cat"]))
    assert seen[0].dtype == torch.float32 and seen[0].item() == 999.0  # bf16 would round t = 999 to 1000
