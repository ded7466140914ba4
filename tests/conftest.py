"""Shared fixtures: tiny random diffusers UNets saved as teacher folders, and diffusers in float64."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers importable as plain modules

# The tests run many small tensor ops: one intra-op thread is faster for them, and on shared 2-core machines
# torch's default 2 threads made a 10k-sample GMM sampling run 25x slower (13.5 s against 0.5 s) while other
# jobs held the cores, every parallel op waiting for a thread that was not scheduled.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # and the commands the tests run, in-process or not (distill.core.cores)


def tiny_unet(num_class_embeds: int | None = None, seed: int = 0, sample_size: int = 8, channels: int = 1):
    """A random 2-level UNet2DModel, a few thousand parameters: fast in float64 on a CPU."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=num_class_embeds,
    )


def save_teacher_folder(root: Path, unet, scheduler, *, layout: str = "pipeline", teacher_json: dict | None = None) -> Path:
    """Write ``unet`` + ``scheduler`` as a diffusers pipeline folder or a bare UNet folder."""
    root = Path(root)
    if layout == "pipeline":
        unet.save_pretrained(root / "unet")
        scheduler.save_pretrained(root / "scheduler")
        index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                 "scheduler": ["diffusers", type(scheduler).__name__]}
        (root / "model_index.json").write_text(json.dumps(index))
    elif layout == "unet":  # scheduler_config.json next to the UNet's config.json
        unet.save_pretrained(root)
        scheduler.save_config(root)
    else:
        raise ValueError(layout)
    if teacher_json is not None:
        (root / "teacher.json").write_text(json.dumps(teacher_json))
    return root


@pytest.fixture
def remote_code_cache(tmp_path, monkeypatch):
    """``trust_remote_code=True`` loads copy a folder's component code (an exported student's
    scheduler/fewstep_scheduler.py) into diffusers' modules cache: a temporary one, not the user's."""
    from diffusers.utils import dynamic_modules_utils

    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


@pytest.fixture
def make_teacher_folder(tmp_path):
    """make_teacher_folder(prediction_type=..., beta_schedule=..., ...) -> (folder, float64 unet, scheduler)."""

    def make(prediction_type="epsilon", beta_schedule="linear", scheduler=None, num_class_embeds=None,
             layout="pipeline", teacher_json=None, name="teacher"):
        from diffusers import DDPMScheduler, UNet2DModel

        if scheduler is None:
            kwargs = {} if beta_schedule == "linear" else {"beta_start": 0.00085, "beta_end": 0.012}
            scheduler = DDPMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type, **kwargs)
        folder = save_teacher_folder(tmp_path / name, tiny_unet(num_class_embeds), scheduler, layout=layout,
                                     teacher_json=teacher_json)
        unet_dir = folder / "unet" if layout == "pipeline" else folder
        net = UNet2DModel.from_pretrained(unet_dir, local_files_only=True).double().eval()
        return folder, net, scheduler

    return make


def tiny_sd_pipeline(root: Path, scheduler=None, seed: int = 0, image_channels: int = 3):
    """A random Stable-Diffusion-style pipeline (UNet2DConditionModel with cross-attention dim 16, a 2-level
    AutoencoderKL, a 2-layer CLIPTextModel with a letter-level BPE vocabulary written here), saved with
    ``StableDiffusionPipeline.save_pretrained`` to ``root``; returns (folder, pipeline in memory). Latents 4x8x8,
    images ``image_channels``x16x16; ~70k parameters in all."""
    import string

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = Path(root)
    words = root.parent / f"{root.name}_vocab"
    words.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        vocab.update({c + suffix: len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    vocab.update({"th": len(vocab), "the</w>": len(vocab) + 1})
    (words / "vocab.json").write_text(json.dumps(vocab))
    (words / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    tokenizer = CLIPTokenizer(str(words / "vocab.json"), str(words / "merges.txt"), model_max_length=12,
                              pad_token="<|endoftext|>")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=12, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=image_channels, out_channels=image_channels, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    # Stable Diffusion 1.5's scheduler settings (scaled_linear betas, steps_offset 1, set_alpha_to_one False)
    scheduler = scheduler or DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                           clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root)
    return root, pipe


class _Promoted:
    """A stand-in for a module whose ``float32`` attribute is float64; everything else is delegated."""

    def __init__(self, module, float64):
        self._module, self.float32 = module, float64

    def __getattr__(self, name):
        return getattr(self._module, name)


def float64_tables(scheduler):
    """Replace a diffusers scheduler's float32 tables by float64 copies of the same values."""
    if not isinstance(getattr(scheduler, "alphas_cumprod", None), torch.Tensor):
        return scheduler
    acp = scheduler.alphas_cumprod.double()
    scheduler.alphas_cumprod = acp
    for name, value in (("alpha_t", acp.sqrt()), ("sigma_t", (1 - acp).sqrt())):
        if isinstance(getattr(scheduler, name, None), torch.Tensor):
            setattr(scheduler, name, value)
    if isinstance(getattr(scheduler, "lambda_t", None), torch.Tensor):
        scheduler.lambda_t = acp.sqrt().log() - (1 - acp).sqrt().log()
    return scheduler


@contextlib.contextmanager
def diffusers_float64(scheduler):
    """Run a diffusers scheduler's set_timesteps/step in float64.

    diffusers 0.42.1 casts to float32 inside several schedulers (DPMSolverMultistep ``step`` does
    ``sample.to(torch.float32)``; ``set_timesteps`` stores ``sigmas.astype(np.float32)``). Inside this
    context the scheduler's module sees float64 wherever it names float32, so the comparison checks
    the algorithm, not float32 rounding. The beta table is left as diffusers built it (float32 values).
    """
    module = sys.modules[type(scheduler).__module__]
    float64_tables(scheduler)
    saved = module.torch, getattr(module, "np", None)
    module.torch = _Promoted(torch, torch.float64)
    if saved[1] is not None:
        module.np = _Promoted(np, np.float64)
    try:
        yield scheduler
    finally:
        module.torch = saved[0]
        if saved[1] is not None:
            module.np = saved[1]


def diffusers_loop(scheduler, net, noise, num_inference_steps, *, class_labels=None, step_kwargs=None, timesteps_out=None):
    """diffusers' own sampling loop: set_timesteps, then model + scheduler.step at every timestep."""
    scheduler.set_timesteps(num_inference_steps)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            x = scheduler.step(net(model_in, t, class_labels=class_labels).sample, t, x, **(step_kwargs or {})).prev_sample
    if timesteps_out is not None:
        timesteps_out.extend(scheduler.timesteps.tolist())
    return x




def load_script(name: str):
    """scripts/<name>.py as a module, so a test can call its ``main(argv)`` in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def existing(tmp_path):
    """A folder with a file in it that no refused command may touch."""
    folder = tmp_path / "existing"
    folder.mkdir()
    (folder / "keep.txt").write_text("results of an earlier run\n")
    return folder
