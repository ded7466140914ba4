"""Text-to-image latent teachers (teachers/sd_pipeline.py) on a tiny random Stable-Diffusion-style pipeline that the
test builds itself: our solvers against diffusers' StableDiffusionPipeline, prompt conditioning through the contracts,
and a consistency distillation run with checkpoint, bit-identical resume and export."""

import json

import pytest
import torch
from conftest import diffusers_float64, tiny_sd_pipeline

from distill.core.conditioning import PromptCond
from distill.solvers import sample
from teachers import load_teacher

PROMPTS = ["the cat", "a red fox"]
STEPS = 6


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder, pipe = tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")
    return folder, pipe.to(torch.float64)


@pytest.fixture(scope="module")
def teacher(sd):
    return load_teacher(sd[0]).to(torch.float64)


def _noise(batch=2):
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _pipeline_latents(pipe, scheduler, guidance_scale):
    pipe.scheduler = scheduler
    with diffusers_float64(scheduler):
        if hasattr(scheduler, "final_alpha_cumprod") and not scheduler.config.set_alpha_to_one:
            scheduler.final_alpha_cumprod = scheduler.alphas_cumprod[0]  # float64 too (diffusers_float64 leaves it)
        out = pipe(prompt=PROMPTS, latents=_noise(), num_inference_steps=STEPS, guidance_scale=guidance_scale,
                   output_type="latent").images
    return out, scheduler.timesteps.tolist()


def test_load_teacher_dispatches_to_the_sd_adapter(sd, teacher):
    from teachers.sd_pipeline import StableDiffusionTeacher

    assert isinstance(teacher, StableDiffusionTeacher)
    assert teacher.data_shape == (4, 8, 8) and teacher.image_shape == (3, 16, 16)
    assert teacher.conditioning == "prompts" and teacher.num_classes == 0
    cond = teacher.encode_prompts(PROMPTS)
    assert isinstance(cond, PromptCond) and cond.embeds.shape == (2, 12, 16)
    ref, _ = sd[1].encode_prompt(PROMPTS, "cpu", 1, True)
    assert torch.equal(cond.embeds, ref)


@pytest.mark.parametrize("guidance_scale", [None, 3.0])
def test_euler_equals_sd_pipeline_with_ddim(sd, teacher, guidance_scale):
    """SD 1.5's DDIM settings (leading spacing, steps_offset 1, set_alpha_to_one False: the last step lands on
    t = 0, not on clean data). Max abs difference seen: 1e-14 (float64 throughout; 2e-8 with DDIM's float32 final_alpha_cumprod)."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(sd[1].scheduler.config)
    ref, timesteps = _pipeline_latents(sd[1], ddim, 1.0 if guidance_scale is None else guidance_scale)
    cond = teacher.encode_prompts(PROMPTS)
    ours = sample(teacher, _noise(), solver="euler", timesteps=[*timesteps, 0], final="t_min", cond=cond,
                  guidance_scale=guidance_scale)
    diff = (ours - ref).abs().max().item()
    print(f"max abs difference {diff:.2e}")
    assert diff < 1e-10


@pytest.mark.parametrize("guidance_scale", [None, 3.0])
def test_dpmpp_2m_equals_sd_pipeline_with_dpm_solver_multistep(sd, teacher, guidance_scale):
    """DPM-Solver++(2M) with diffusers' defaults for SD except a final step to clean data (final_sigmas_type zero).
    Max abs difference seen: 4e-14 (float64 throughout)."""
    from diffusers import DPMSolverMultistepScheduler

    dpm = DPMSolverMultistepScheduler.from_config(sd[1].scheduler.config, algorithm_type="dpmsolver++", solver_order=2,
                                                  final_sigmas_type="zero", lower_order_final=True)
    ref, timesteps = _pipeline_latents(sd[1], dpm, 1.0 if guidance_scale is None else guidance_scale)
    ours = sample(teacher, _noise(), solver="dpmpp_2m", timesteps=timesteps, cond=teacher.encode_prompts(PROMPTS),
                  guidance_scale=guidance_scale)
    diff = (ours - ref).abs().max().item()
    print(f"max abs difference {diff:.2e}")
    assert diff < 1e-10


def test_bad_folders_are_refused_with_one_sentence(sd, tmp_path):
    import shutil

    no_tokenizer = tmp_path / "no_tok"
    shutil.copytree(sd[0], no_tokenizer)
    shutil.rmtree(no_tokenizer / "tokenizer")
    with pytest.raises(FileNotFoundError, match="lacks a tokenizer"):
        load_teacher(no_tokenizer)
    wrong_unet = tmp_path / "wrong_unet"
    shutil.copytree(sd[0], wrong_unet)
    config = json.loads((wrong_unet / "unet" / "config.json").read_text())
    (wrong_unet / "unet" / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="not a UNet2DConditionModel"):
        load_teacher(wrong_unet)
    with pytest.raises(ValueError, match="needs its whole pipeline folder"):
        load_teacher(sd[0] / "unet")


def test_cond_kinds_are_checked(teacher):
    with pytest.raises(ValueError, match="text-conditioned"):
        teacher.denoise(_noise(), 500.0, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="2 prompts for a batch of 1"):
        teacher.denoise(_noise(1), 500.0, teacher.encode_prompts(PROMPTS))
    uncond = teacher.denoise(_noise(), 500.0)  # None: the empty prompt
    assert torch.equal(uncond, teacher.denoise(_noise(), 500.0, teacher.encode_prompts(["", ""])))
    images = teacher.decode(_noise())
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    assert teacher.encode_images(images).shape == (2, 4, 8, 8)


def _pairs_folder(root):
    """Six random 16x16 images with captions (an imagefolder with metadata.jsonl)."""
    from PIL import Image

    root.mkdir()
    g = torch.Generator().manual_seed(0)
    captions = ["the cat", "a red fox", "the sea", "a dog", "the sky", ""]
    with open(root / "metadata.jsonl", "w") as f:
        for i, text in enumerate(captions):
            pixels = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": text}) + "\n")
    return root


def test_lcm_style_consistency_distillation_resumes_bit_identically_and_exports(sd, tmp_path):
    """configs/distill/cd_sd15.yaml on the tiny pipeline: image-caption pairs -> VAE latents + prompt embeddings,
    w-conditioned student through the UNet's time_cond_proj_dim, guided DDIM teacher steps."""
    from distill_helpers import run, same_tensors
    from test_distill_export import _export_cli

    from distill.engine.config import parse_overrides
    from distill.engine.run_config import load_run_config
    from students import load_student

    data = _pairs_folder(tmp_path / "pairs")
    config = __import__("distill_helpers").ROOT / "configs" / "distill" / "cd_sd15.yaml"
    tiny = [f"teacher={sd[0]}", f"dataset=hf:{data}", "objective.num_scales=6", "objective.guidance_range=[1.5, 3.0]",
            "batch_size=3", "max_steps=4", "checkpoint_every=2", "log_every=1", "optim.warmup_steps=0", "optim.lr=1e-3"]
    cfg = lambda out, *more: load_run_config(config, parse_overrides([*tiny, *more, f"output_dir={out}"]))  # noqa: E731
    run(cfg(tmp_path / "full"))
    run(cfg(tmp_path / "cut", "max_steps=2"))
    run(cfg(tmp_path / "cut"), resume="latest")
    for name in ("student.safetensors", "student_ema.safetensors"):
        assert same_tensors(tmp_path / "full" / name, tmp_path / "cut" / name)
    assert _export_cli()([str(tmp_path / "full"), "--out", str(tmp_path / "s.safetensors")]) == 0
    student = load_student(tmp_path / "s.safetensors").eval()
    assert type(student.net).__name__ == "UNet2DConditionModel" and student.net.config.time_cond_proj_dim == 256
    assert student.info["conditioning"] == "prompts"
    proj = student.net.time_embedding.cond_proj.weight
    assert proj.abs().max() > 0  # trained away from its zero initialisation
    teacher = load_teacher(sd[0])
    cond, noise = teacher.encode_prompts(PROMPTS), _noise().float()
    one, two = student.sample(noise, 1, cond, w=2.0), student.sample(noise, 2, cond, generator=torch.Generator().manual_seed(0))
    assert one.shape == two.shape == (2, 4, 8, 8) and torch.isfinite(one).all() and torch.isfinite(two).all()
    assert not torch.equal(one, student.sample(noise, 1, cond, w=3.0))  # w reaches the network
    assert teacher.decode(one).shape == (2, 3, 16, 16)


def test_prompts_are_encoded_once_per_prompt_never_per_nfe(sd):
    teacher = load_teacher(sd[0])
    calls = []
    teacher.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    cond = teacher.encode_prompts(PROMPTS)
    assert len(calls) == 2  # the prompts in one batch, the empty prompt (the null branch) in another
    sample(teacher, _noise().float(), solver="dpmpp_2m", nfe=4, cond=cond, guidance_scale=2.0)
    teacher.encode_prompts(PROMPTS[::-1], negative_prompts="")
    assert len(calls) == 2  # neither sampling nor a second batch of known prompts calls the text encoder


def test_prompt_datasets(tmp_path):
    from distill.data import load_dataset

    (tmp_path / "p.txt").write_text("a cat\n\n  the sea  \na dog\n")
    ds = load_dataset(f"prompts:{tmp_path / 'p.txt'}")
    assert len(ds) == 3 and ds[1] == (None, "the sea") and ds.data_shape is None
    order = ds.ordered(seed=0, n=7)
    assert order == ds.ordered(seed=0, n=7) and sorted(order[:3]) == sorted(ds.prompts) and len(order) == 7
    with pytest.raises(FileNotFoundError, match="prompt file .* does not exist"):
        load_dataset(f"prompts:{tmp_path / 'none.txt'}")
    pairs = load_dataset(f"hf:{_pairs_folder(tmp_path / 'pairs')}", resolution=16, text_column="text")
    x, caption = pairs[0]
    assert x.shape == (3, 16, 16) and caption == "the cat"
    assert load_dataset(f"prompts:hf:{tmp_path / 'pairs'}")[0] == (None, "the cat")


class _ImageStats:
    """A stand-in metric (FID needs Inception weights, which tests do not download): the samples' shape and mean."""

    reference_id = "stub"

    def __init__(self):
        self.seen = []

    def __call__(self, x, labels=None):
        self.seen.append(x)
        assert labels is None
        return {"fid": float(x.abs().mean())}

    def check(self, n):
        pass

    def data_kinds(self):
        return []


def test_bench_takes_prompts_in_a_seeded_order_and_measures_decoded_images(sd, tmp_path):
    from distill.engine.run_config import StudentConfig
    from distill.eval.bench import BenchConfig, cond_for, generate, plan_cells, prompt_order, run_bench
    from students import build_student

    teacher = load_teacher(sd[0])
    (tmp_path / "p.txt").write_text("the cat\na red fox\nthe sea\n")
    spec = f"prompts:{tmp_path / 'p.txt'}"
    cfg = BenchConfig(num_samples=5, seed=2, batch_size=2, prompts=spec, guidance_scale=2.0)
    cfg.validate(teacher)
    order = prompt_order(cfg)
    assert sorted(order[:3]) == ["a red fox", "the cat", "the sea"] and len(order) == 5
    assert torch.equal(cond_for(teacher, cfg, 1, 3).embeds, teacher.encode_prompts(order[1:3]).embeds)
    student = build_student(StudentConfig(), teacher).eval()
    metric = _ImageStats()
    rows = run_bench(teacher, plan_cells(["euler", "dpmpp_2m"], [2], ["copy"], [1]), cfg, metric, tmp_path / "b",
                     students={"copy": student})
    assert len(rows) == 3 and all(r["labels"].startswith("prompts:") for r in rows)
    assert all(x.shape == (5, 3, 16, 16) and x.abs().max() <= 1 for x in metric.seen)  # VAE-decoded before measuring
    cell = plan_cells(["euler"], [2])[0]
    whole, _ = generate(teacher, cell, BenchConfig(num_samples=5, seed=2, batch_size=5, prompts=spec, guidance_scale=2.0))
    assert torch.allclose(whole, metric.seen[0], atol=1e-5)  # another batch size: the same noise and prompts per sample
    with pytest.raises(ValueError, match="text-conditioned: give a prompt file"):
        BenchConfig(num_samples=5).validate(teacher)


def test_sample_script_with_a_prompt(sd, tmp_path):
    from conftest import load_script
    from safetensors.torch import load_file

    main = load_script("sample").main
    out = tmp_path / "fox"
    assert main(["--teacher", str(sd[0]), "--prompt", "a red fox", "--guidance-scale", "2", "--solver", "dpmpp_2m",
                 "--nfe", "3", "--n", "3", "--batch-size", "2", "--out", str(out)]) == 0
    saved = load_file(str(out / "samples.safetensors"))
    assert saved["samples"].shape == (3, 4, 8, 8) and saved["images"].shape == (3, 3, 16, 16)
    assert (out / "samples.png").is_file()
    with pytest.raises(SystemExit, match="text-conditioned: give --prompt"):
        main(["--teacher", str(sd[0]), "--solver", "euler", "--nfe", "2", "--out", str(tmp_path / "none")])


def test_lcm_lora_with_a_fixed_guidance_scale(sd, tmp_path):
    """LCM-LoRA's shape of run (the README's target modules) with the teacher guided at one fixed w: only the adapter
    trains, the export merges it, and the student has no w input."""
    from distill_helpers import ROOT, run

    from distill.engine.config import parse_overrides
    from distill.engine.run_config import load_run_config
    from students import load_student

    modules = ("[to_q, to_k, to_v, to_out.0, proj_in, proj_out, ff.net.0.proj, ff.net.2, conv1, conv2, conv_shortcut, "
               "downsamplers.0.conv, upsamplers.0.conv, time_emb_proj]")
    overrides = [f"teacher={sd[0]}", f"dataset=hf:{_pairs_folder(tmp_path / 'pairs')}", "objective.num_scales=6",
                 "objective.guidance_range=null", "objective.guidance_scale=2.0", "batch_size=3", "max_steps=2",
                 "checkpoint_every=2", f"lora={{rank: 4, alpha: 4, target_modules: {modules}}}", "optim.lr=1e-3",
                 f"output_dir={tmp_path / 'lora'}"]
    run(load_run_config(ROOT / "configs" / "distill" / "cd_sd15.yaml", parse_overrides(overrides)))
    student = load_student(tmp_path / "lora" / "student.safetensors")
    assert student.net.config.time_cond_proj_dim is None and not student.conditions
    teacher = load_teacher(sd[0])
    changed = [k for k, v in student.net.state_dict().items() if not torch.equal(v, teacher.unet.state_dict()[k])]
    assert changed and all(any(m in k for m in ("to_q", "to_k", "to_v", "to_out", "proj_", "ff.net", "conv", "time_emb"))
                           for k in changed)


def test_data_free_distribution_matching_with_a_prompt_file(sd, tmp_path):
    """A prompt file feeds batch.cond of an objective that needs no data (VSD with the guided teacher as the real
    score, a trainable copy of the UNet as the fake score); resume is bit-identical; a prompt file is refused where
    data samples are needed."""
    from distill_helpers import ROOT, run, same_tensors

    from distill.engine.config import ConfigError, parse_overrides
    from distill.engine.run_config import load_run_config

    (tmp_path / "p.txt").write_text("the cat\na red fox\nthe sea\na dog\n")
    base = [f"teacher={sd[0]}", f"dataset=prompts:{tmp_path / 'p.txt'}", "objective.guidance_scale=2.0",
            "objective.critic_steps=1", "student.class_conditional=false", "batch_size=2", "max_steps=3",
            "checkpoint_every=1", "ema_decay=null", "optim.lr=1e-3"]
    cfg = lambda out, *more: load_run_config(ROOT / "configs" / "distill" / "vsd_mnist16.yaml",  # noqa: E731
                                             parse_overrides([*base, *more, f"output_dir={out}"]))
    run(cfg(tmp_path / "full"))
    run(cfg(tmp_path / "cut", "max_steps=1"))
    run(cfg(tmp_path / "cut"), resume="latest")
    assert same_tensors(tmp_path / "full" / "student.safetensors", tmp_path / "cut" / "student.safetensors")
    with pytest.raises(ConfigError, match="holds prompts without images, but objective 'consistency' needs data"):
        run(load_run_config(ROOT / "configs" / "distill" / "cd_sd15.yaml", parse_overrides(
            [f"teacher={sd[0]}", f"dataset=prompts:{tmp_path / 'p.txt'}", "dataset_options={}", "max_steps=1",
             f"output_dir={tmp_path / 'cd'}"])))


def test_bench_cli_measures_decoded_images_of_a_prompt_teacher_with_the_digit_extractor(tmp_path):
    """End to end through scripts/bench.py: a grey-image tiny pipeline, a prompt file, FID and the data rows from the
    mnist16 classifier's features of the VAE-decoded samples."""
    import csv

    from conftest import load_script

    folder, _ = tiny_sd_pipeline(tmp_path / "grey", image_channels=1)
    (tmp_path / "p.txt").write_text("the cat\na red fox\n")
    out = tmp_path / "bench"
    argv = ["--teacher", str(folder), "--prompts", f"prompts:{tmp_path / 'p.txt'}", "--solvers", "euler", "--nfe", "2",
            "--num-samples", "20", "--batch-size", "10", "--bootstrap", "5", "--kid-subset-size", "10",
            "--fid-cache", str(tmp_path / "cache"), "--out", str(out)]
    assert load_script("bench").main(argv) in (0, None)
    with open(out / "fid_vs_nfe.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    (cell,) = [r for r in rows if r["kind"] == "solver"]
    floor = next(r for r in rows if r["kind"] == "floor")
    assert cell["labels"].startswith("prompts:") and cell["num_samples"] == "20" and cell["reference_id"] == floor["reference_id"]
    assert 0 < float(floor["fid"]) < float(cell["fid"])  # real digits beat a random pipeline's decoded noise
