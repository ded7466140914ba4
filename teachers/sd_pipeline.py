"""Text-to-image latent teachers: a local diffusers Stable-Diffusion-style pipeline folder, loaded offline.

The folder is what ``StableDiffusionPipeline.save_pretrained`` writes: ``model_index.json`` naming a
``UNet2DConditionModel`` unet, and ``unet/``, ``vae/`` (AutoencoderKL), ``text_encoder/`` and ``tokenizer/``
(transformers classes, e.g. CLIPTextModel / CLIPTokenizer) and ``scheduler/``. The teacher is the UNet in latent
space, through the same denoiser contract as a pixel UNet (``data_shape`` is the latent shape; the schedule and
parameterization come from the scheduler config exactly as for ``teachers.diffusers_folder``: epsilon,
v_prediction, sample, FlowMatch*). Conditioning is a ``distill.core.conditioning.PromptCond``:

    cond = teacher.encode_prompts(["a red fox", ...])            # text encoder once per prompt batch (cached)
    latents = sample(teacher, noise, solver="dpmpp_2m", nfe=8, cond=cond, guidance_scale=7.5)
    images = teacher.decode(latents)                              # VAE decode, in [-1, 1]

The unconditional branch of classifier-free guidance is the empty prompt's embeddings (or ``negative_prompts``),
batched with the conditional branch as one network call per NFE, as StableDiffusionPipeline does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distill.core.conditioning import PromptCond
from teachers.diffusers_folder import DiffusersTeacher
from teachers.folders import COND_UNET, file_hash, read_json, schedule_from_scheduler_config

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class StableDiffusionTeacher(DiffusersTeacher):
    """A UNet2DConditionModel in the VAE's latent space, conditioned on text-encoder prompt embeddings."""

    conditioning = "prompts"

    def __init__(self, unet, schedule, prediction_type: str, *, text_encoder, tokenizer, vae, time_scale: float = 1.0,
                 name: str = "sd", content_hash: str | None = None):
        super().__init__(unet, schedule, prediction_type, time_scale=time_scale, name=name, content_hash=content_hash)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_shape = (vae.config.in_channels, *(s * self.vae_scale_factor for s in self.data_shape[1:]))
        self._prompt_cache: dict[str, torch.Tensor] = {}  # prompt -> [L, D] embeddings (text encoder's dtype, CPU)
        self.offload_encoders = False  # True: ``to`` moves and casts the UNet only (text encoder and VAE stay put)

    # -- conditioning ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        """[B, L, D] embeddings of ``texts``, as StableDiffusionPipeline.encode_prompt computes them (max-length
        padding, truncation, the encoder's attention mask only when its config asks for one); each distinct
        prompt goes through the text encoder once per teacher and is cached."""
        missing = sorted(set(texts) - set(self._prompt_cache))
        if missing:
            tok = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt")
            device = next(self.text_encoder.parameters()).device
            use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
            mask = tok.attention_mask.to(device) if use_mask else None
            out = self.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0]
            self._prompt_cache.update({text: row.cpu() for text, row in zip(missing, out)})
        return torch.stack([self._prompt_cache[text] for text in texts])

    def encode_prompts(self, prompts, negative_prompts=None) -> PromptCond:
        """The conditioning of a batch of prompts (one string per sample; ``negative_prompts``: one string, or one per
        sample, for the unconditional branch; default the empty prompt)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings (one per sample)")
        negative = [""] * len(prompts) if negative_prompts is None else negative_prompts
        negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if len(negative) != len(prompts):
            raise ValueError(f"got {len(negative)} negative prompts for {len(prompts)} prompts; give one, or one per prompt")
        device, dtype = self.unet.device, self.unet.dtype
        return PromptCond(self._embed_texts(prompts).to(device, dtype), self._embed_texts(negative).to(device, dtype))

    def _check_cond(self, cond, batch: int):
        if cond is None:  # unconditional: the empty prompt
            return self.encode_prompts([""] * batch)
        if not isinstance(cond, PromptCond):
            raise ValueError(f"teacher {self.name!r} is text-conditioned: pass cond=teacher.encode_prompts([...]) "
                             f"(one prompt per sample), not {type(cond).__name__}")
        if len(cond) != batch:
            raise ValueError(f"cond holds {len(cond)} prompts for a batch of {batch}")
        return cond

    # -- pixels <-> latents ------------------------------------------------------------------------------
    def _vae_factors(self) -> tuple[float, float]:
        cfg = self.vae.config
        return float(cfg.scaling_factor), float(getattr(cfg, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] [B, C, H, W] from latents [B, *data_shape] (evaluation and sample grids)."""
        scale, shift = self._vae_factors()
        p = next(self.vae.parameters())
        images = self.vae.decode((latents / scale + shift).to(p.device, p.dtype)).sample
        return images.clamp(-1, 1).to(latents.device, latents.dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of images in [-1, 1]: the VAE posterior's mean, scaled as diffusers' training scripts scale it
        (the mean rather than a posterior sample: the same image always gives the same latent)."""
        scale, shift = self._vae_factors()
        p = next(self.vae.parameters())
        mean = self.vae.encode(images.to(p.device, p.dtype)).latent_dist.mean
        return ((mean - shift) * scale).to(images.device, images.dtype)

    def to(self, *args, **kwargs) -> "StableDiffusionTeacher":
        """Move / cast the UNet, and the text encoder and VAE unless ``offload_encoders`` keeps them where they are
        (the CPU, float32: prompts are encoded once each there, images per batch)."""
        super().to(*args, **kwargs)
        if not self.offload_encoders:
            self.text_encoder.to(*args, **kwargs)
            self.vae.to(*args, **kwargs)
        self._prompt_cache.clear()
        return self


# What model_index.json may name for each component: the classes this loader can use (a text encoder whose first output
# is its last hidden state, as the UNet's cross-attention needs). Anything else is refused before any import, as
# importing a module named by a file would run that module's code.
ALLOWED_CLASSES = {
    "unet": (("diffusers", COND_UNET),),
    "vae": (("diffusers", "AutoencoderKL"),),
    "text_encoder": (("transformers", "CLIPTextModel"), ("transformers", "T5EncoderModel")),
    "tokenizer": tuple(("transformers", c) for c in ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast")),
}


def _allowed(name: str, library, class_name) -> bool:
    if name == "scheduler":  # any of diffusers' schedulers (the schedule itself is read from its config)
        return library == "diffusers" and isinstance(class_name, str) and class_name.isidentifier() and class_name.endswith("Scheduler")
    return (library, class_name) in ALLOWED_CLASSES[name]


def _check_present(index: dict, name: str, root: Path) -> None:
    entry = index.get(name)
    if not (isinstance(entry, list) and len(entry) == 2 and entry[1]) or not (root / name).is_dir():
        raise FileNotFoundError(f"pipeline folder {str(root)!r} lacks a {name} (model_index.json entry and {name}/ "
                                f"folder); a text-to-image teacher needs {', '.join(COMPONENTS)}")


def _component_entry(index: dict, name: str, root: Path) -> tuple[str, str]:
    """The (library, class) model_index.json names for component ``name``, checked against ``ALLOWED_CLASSES``."""
    _check_present(index, name, root)
    library, class_name = index[name]
    if not (isinstance(library, str) and isinstance(class_name, str) and _allowed(name, library, class_name)):
        allowed = "a diffusers scheduler (diffusers.<Name>Scheduler)" if name == "scheduler" else " or ".join(
            f"{lib}.{cls}" for lib, cls in ALLOWED_CLASSES[name])
        raise ValueError(f"model_index.json of {str(root)!r} names {library}.{class_name} for {name}, which a text-to-image "
                         f"teacher cannot use; allowed: {allowed} (nothing else is imported)")
    return library, class_name


def _component_class(library: str, class_name: str, name: str, root: Path):
    import importlib

    module = importlib.import_module(library)  # diffusers or transformers: _component_entry allows no other
    if not hasattr(module, class_name):
        raise ValueError(f"model_index.json of {str(root)!r} names {library}.{class_name} for {name}, which does not exist")
    return getattr(module, class_name)


def load_sd_pipeline_teacher(path: str | Path) -> StableDiffusionTeacher:
    """A ``StableDiffusionTeacher`` from a local pipeline folder (module doc), with ``local_files_only=True``."""
    root = Path(path)
    index = read_json(root / "model_index.json")
    for name in COMPONENTS:  # every part present first (a missing part is named before a class is judged)
        _check_present(index, name, root)
    entries = {name: _component_entry(index, name, root) for name in COMPONENTS}  # all checked before any import
    classes = {name: _component_class(*entries[name], name, root) for name in COMPONENTS}
    for name in PARTS:  # each part's config and weights present before any is read
        _refuse_part(root, name, _part_problem(root / name, name))
    unet_cfg = read_json(root / "unet" / "config.json")
    if unet_cfg.get("_class_name") != COND_UNET or classes["unet"].__name__ != COND_UNET:
        raise ValueError(f"{root}/unet is a {unet_cfg.get('_class_name')!r}, not a {COND_UNET}; a text-to-image teacher "
                         f"folder needs a {COND_UNET} unet")
    sched_path = root / "scheduler" / "scheduler_config.json"
    if not sched_path.is_file():
        raise FileNotFoundError(f"pipeline folder {str(root)!r} lacks scheduler/scheduler_config.json")
    schedule, prediction, time_scale = schedule_from_scheduler_config(read_json(sched_path))
    loaded = {name: _load_part(classes[name], root, name) for name in PARTS}
    return StableDiffusionTeacher(loaded["unet"], schedule, prediction, time_scale=time_scale,
                                  text_encoder=loaded["text_encoder"], tokenizer=loaded["tokenizer"], vae=loaded["vae"],
                                  name=str(path), content_hash=pipeline_hash(root))


WEIGHTS = ("*.safetensors", "*.bin")  # what from_pretrained reads a part's weights from
PARTS = ("unet", "vae", "text_encoder", "tokenizer")  # the components loaded with from_pretrained


def _refuse_part(root: Path, name: str, problem: str | None) -> None:
    if problem:
        raise ValueError(f"the {name} of pipeline folder {str(root)!r} cannot be loaded: {problem}; restore {name}/ from "
                         f"the pipeline it came from")


def _load_part(cls, root: Path, name: str):
    """``cls.from_pretrained`` of the part ``root/name``; a part that does not load is named in one sentence with what is
    wrong with it (a damaged weights file), not diffusers' or transformers' traceback."""
    try:
        return cls.from_pretrained(root / name, local_files_only=True)
    except Exception as e:  # diffusers, transformers and safetensors raise OSError, ValueError and their own errors
        _refuse_part(root, name, _weights_problem(root / name) or f"{type(e).__name__}: {(str(e).strip() or '?').splitlines()[0][:200]}")


def _part_problem(folder: Path, name: str) -> str | None:
    """What is missing from the part ``folder`` before it is loaded: its config (valid JSON) or its weights file."""
    config = folder / ("tokenizer_config.json" if name == "tokenizer" else "config.json")
    if not config.is_file():
        return None if name == "tokenizer" else f"it has no {config.name}"  # a tokenizer may do without its config
    try:
        json.loads(config.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"its {config.name} is not valid JSON ({e})"
    if name != "tokenizer" and not any(p for pattern in WEIGHTS for p in folder.glob(pattern)):
        return "it has no weights file (diffusion_pytorch_model.safetensors, model.safetensors or a .bin)"
    return None


def _weights_problem(folder: Path) -> str | None:
    """A safetensors weights file of ``folder`` that is truncated or damaged, named (None if all read)."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception as e:  # safetensors' own error types
            return f"its weights file {path.name} is truncated or damaged ({e})"
    return None


def pipeline_hash(root: Path) -> str:
    """The content hash of a text-to-image teacher folder (what student files record as ``teacher_hash``)."""
    root = Path(root)
    files = [root / "model_index.json", root / "scheduler" / "scheduler_config.json"] + sorted(
        p for name in ("unet", "vae", "text_encoder", "tokenizer") for p in (root / name).rglob("*") if p.is_file())
    return file_hash(files)
