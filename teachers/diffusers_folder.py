"""Teachers from local diffusers folders (``UNet2DModel`` + a scheduler config), loaded offline; a pipeline
folder whose unet is a ``UNet2DConditionModel`` (Stable Diffusion style) is ``teachers.sd_pipeline``'s
(``teachers.load_teacher`` tells them apart with ``teachers.folders.names_cond_unet``).

Accepted layouts:
  * a pipeline folder: ``model_index.json`` with ``unet/`` and ``scheduler/`` beside it;
  * a ``UNet2DModel`` folder (``config.json`` + weights) with ``scheduler_config.json`` inside it, in a
    ``scheduler/`` subfolder, or in a sibling ``../scheduler/`` folder.
An optional ``teacher.json`` (in the pipeline or unet folder) may give ``{"num_classes": K,
"null_class_label": K}`` for a class-conditional UNet trained with label dropout; without it, a
class-conditional UNet has ``num_class_embeds`` classes and no unconditional mode.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from distill.core.denoisers import NetDenoiser
from teachers.base import Teacher
from teachers.folders import COND_UNET, file_hash, read_json, resolve_folder, schedule_from_scheduler_config


class DiffusersTeacher(Teacher):
    """A diffusers ``UNet2DModel`` seen through the denoiser contract."""

    def __init__(self, unet, schedule, prediction_type: str, *, time_scale: float = 1.0, num_classes: int | None = None,
                 null_class_label: int | None = None, name: str = "unet", content_hash: str | None = None):
        self.unet = unet.eval().requires_grad_(False)
        self.schedule, self.prediction_type, self.time_scale = schedule, prediction_type, time_scale
        cfg = unet.config
        if "dim" in cfg:  # ToyMLP: vectors
            self.data_shape = (cfg.dim,)
        else:
            size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size, cfg.sample_size)
            self.data_shape = (cfg.in_channels, *size)
        embeds = cfg.num_class_embeds or 0
        self.num_classes = embeds if num_classes is None else num_classes
        self.null_class_label = null_class_label
        self.has_uncond = self.num_classes == 0 or null_class_label is not None
        # the network as a denoiser (labels -1 -> the null class; without one, class 0 stands in for None)
        null = (null_class_label or 0) if self.num_classes else None
        self.model = NetDenoiser(self.unet, schedule, prediction_type, time_scale=time_scale, null_class_label=null)
        self.name = name
        self.hash = content_hash or _state_hash(unet)

    def _denoise(self, x, t, cond):
        if self.num_classes and cond is None:
            cond = torch.full((x.shape[0],), -1, dtype=torch.long)
        return self.model.denoise(x, t, cond)

    def _denoise_features(self, x, t, cond):
        """(x0_hat, the network's bottleneck output: a UNet's mid block [B, C, H, W]) from one call (AMED's feature)."""
        if self.num_classes and cond is None:
            cond = torch.full((x.shape[0],), -1, dtype=torch.long)
        d, features = self.model.features(x, t, cond)
        return d, features.to(x.dtype)

    def to(self, *args, **kwargs) -> "DiffusersTeacher":
        self.model.to(*args, **kwargs)
        return self


def _state_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256(json.dumps(dict(module.config), sort_keys=True, default=str).encode())
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_diffusers_teacher(path: str | Path) -> DiffusersTeacher:
    from diffusers import UNet2DModel  # imported here: diffusers takes seconds to import

    from teachers.toy_mlp import ToyMLP

    classes = {"UNet2DModel": UNet2DModel, "ToyMLP": ToyMLP}
    unet_dir, sched_path, meta_dir = resolve_folder(path)
    unet_cfg = read_json(unet_dir / "config.json")
    if unet_cfg.get("_class_name") == COND_UNET:
        raise ValueError(f"{unet_dir} holds a {COND_UNET}, which needs its whole pipeline folder (model_index.json with "
                         f"unet, vae, text_encoder, tokenizer and scheduler); load the folder above it")
    if unet_cfg.get("_class_name") not in classes:
        raise ValueError(f"{unet_dir}/config.json describes {unet_cfg.get('_class_name')!r}; supported: "
                         f"{', '.join(map(repr, classes))}")
    schedule, prediction, time_scale = schedule_from_scheduler_config(read_json(sched_path))
    meta = {}
    for folder in (meta_dir, unet_dir):
        if (folder / "teacher.json").is_file():
            meta = read_json(folder / "teacher.json")
            break
    unet = classes[unet_cfg["_class_name"]].from_pretrained(unet_dir, local_files_only=True)
    weights = sorted(unet_dir.glob("*.safetensors")) + sorted(unet_dir.glob("*.bin"))
    content_hash = file_hash([unet_dir / "config.json", sched_path, *weights])
    return DiffusersTeacher(unet, schedule, prediction, time_scale=time_scale, num_classes=meta.get("num_classes"),
                            null_class_label=meta.get("null_class_label"), name=str(path), content_hash=content_hash)
