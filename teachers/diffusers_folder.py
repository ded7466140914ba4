"""Teachers from local diffusers folders (``UNet2DModel`` + a scheduler config), loaded offline; a pipeline
folder whose unet is a ``UNet2DConditionModel`` (Stable Diffusion style) goes to ``teachers.sd_pipeline``.

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

from distill.denoisers import NetDenoiser
from distill.schedules import DiscreteVP, RectifiedFlow
from teachers.base import Teacher

VP_PREDICTIONS = ("epsilon", "sample", "v_prediction")
LAYOUT_HELP = (
    "a diffusers pipeline folder (model_index.json with unet/ and scheduler/) or a UNet2DModel folder "
    "(config.json) with a scheduler_config.json inside it, in scheduler/, or in ../scheduler/"
)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path} as JSON ({e})") from None


def resolve_folder(path: str | Path) -> tuple[Path, Path, Path]:
    """(unet folder, scheduler config file, folder holding teacher.json if any) of a teacher folder."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"teacher folder {str(root)!r} does not exist; expected {LAYOUT_HELP}")
    if (root / "model_index.json").is_file():
        unet, sched = root / "unet", root / "scheduler" / "scheduler_config.json"
        for needed in (unet / "config.json", sched):
            if not needed.is_file():
                raise FileNotFoundError(f"pipeline folder {str(root)!r} lacks {needed.relative_to(root)}; expected {LAYOUT_HELP}")
        return unet, sched, root
    if (root / "config.json").is_file():
        candidates = [root / "scheduler_config.json", root / "scheduler" / "scheduler_config.json",
                      root.parent / "scheduler" / "scheduler_config.json"]
        for sched in candidates:
            if sched.is_file():
                return root, sched, root
        raise FileNotFoundError(f"UNet folder {str(root)!r} has no scheduler config; expected {LAYOUT_HELP}")
    raise FileNotFoundError(f"folder {str(root)!r} has neither model_index.json nor config.json; expected {LAYOUT_HELP}")


def schedule_from_scheduler_config(config: dict):
    """(schedule, prediction_type, time_scale) for a diffusers scheduler config.

    DDPM-family configs (``beta_schedule``) give a ``DiscreteVP``; ``FlowMatch*`` schedulers give
    ``RectifiedFlow`` with a velocity-predicting network called at ``t * num_train_timesteps``.
    """
    name = config.get("_class_name", "")
    if name.startswith("FlowMatch"):
        return RectifiedFlow(t_min=1.0 / config.get("num_train_timesteps", 1000)), "flow", float(config.get("num_train_timesteps", 1000))
    if "beta_schedule" in config or "trained_betas" in config:
        if config.get("rescale_betas_zero_snr", False):
            raise ValueError("schedulers with rescale_betas_zero_snr=True are not supported (zero terminal SNR has no finite log-SNR)")
        prediction = config.get("prediction_type", "epsilon")
        if prediction not in VP_PREDICTIONS:
            raise ValueError(f"unsupported prediction_type {prediction!r}; allowed: {', '.join(VP_PREDICTIONS)}")
        schedule = DiscreteVP(
            beta_schedule=config.get("beta_schedule", "linear"),
            num_train_timesteps=config.get("num_train_timesteps", 1000),
            beta_start=config.get("beta_start", 0.0001),
            beta_end=config.get("beta_end", 0.02),
            trained_betas=config.get("trained_betas"),
        )
        return schedule, prediction, 1.0
    raise ValueError(
        f"unsupported scheduler {name!r}: expected a DDPM-family config (with beta_schedule) or a FlowMatch* scheduler"
    )


def _file_hash(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


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

    from teachers.sd_pipeline import COND_UNET, load_sd_pipeline_teacher, names_cond_unet
    from teachers.toy_mlp import ToyMLP

    classes = {"UNet2DModel": UNet2DModel, "ToyMLP": ToyMLP}
    if Path(path).is_dir() and names_cond_unet(Path(path)):
        return load_sd_pipeline_teacher(path)
    unet_dir, sched_path, meta_dir = resolve_folder(path)
    unet_cfg = _read_json(unet_dir / "config.json")
    if unet_cfg.get("_class_name") == COND_UNET:
        raise ValueError(f"{unet_dir} holds a {COND_UNET}, which needs its whole pipeline folder (model_index.json with "
                         f"unet, vae, text_encoder, tokenizer and scheduler); load the folder above it")
    if unet_cfg.get("_class_name") not in classes:
        raise ValueError(f"{unet_dir}/config.json describes {unet_cfg.get('_class_name')!r}; supported: "
                         f"{', '.join(map(repr, classes))}")
    schedule, prediction, time_scale = schedule_from_scheduler_config(_read_json(sched_path))
    meta = {}
    for folder in (meta_dir, unet_dir):
        if (folder / "teacher.json").is_file():
            meta = _read_json(folder / "teacher.json")
            break
    unet = classes[unet_cfg["_class_name"]].from_pretrained(unet_dir, local_files_only=True)
    weights = sorted(unet_dir.glob("*.safetensors")) + sorted(unet_dir.glob("*.bin"))
    content_hash = _file_hash([unet_dir / "config.json", sched_path, *weights])
    return DiffusersTeacher(unet, schedule, prediction, time_scale=time_scale, num_classes=meta.get("num_classes"),
                            null_class_label=meta.get("null_class_label"), name=str(path), content_hash=content_hash)
