"""What the two folder loaders share (``teachers.diffusers_folder`` for pixel UNets, ``teachers.sd_pipeline`` for
text-to-image pipelines): reading a folder's JSON with one clear sentence, finding its unet and scheduler config, the
schedule a diffusers scheduler config describes, telling a text-to-image pipeline folder from a pixel one, and the
content hash of a folder's files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from distill.core.file_cache import cached_text
from distill.core.schedules import DiscreteVP, RectifiedFlow

VP_PREDICTIONS = ("epsilon", "sample", "v_prediction")
LAYOUT_HELP = (
    "a diffusers pipeline folder (model_index.json with unet/ and scheduler/) or a UNet2DModel folder "
    "(config.json) with a scheduler_config.json inside it, in scheduler/, or in ../scheduler/"
)
COND_UNET = "UNet2DConditionModel"


def read_json(path: Path) -> dict:
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


def file_hash(paths: list[Path]) -> str:
    """sha256 over each file's name and bytes, in order: a teacher folder's content hash. Read once per version of the
    files (kept in ``distill.core.file_cache`` by path, size and mtime), not at every start."""

    def compute() -> str:
        h = hashlib.sha256()
        for p in paths:
            h.update(p.name.encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()

    return cached_text([Path(p) for p in paths], "teacher-file-hash", compute)


def names_cond_unet(root: Path) -> bool:
    """Whether the folder ``root`` is a pipeline whose model_index.json (or unet config) names a UNet2DConditionModel."""
    index = root / "model_index.json"
    if index.is_file():
        unet = read_json(index).get("unet") or [None, None]
        if isinstance(unet, list) and len(unet) == 2 and unet[1] == COND_UNET:
            return True
    config = root / "unet" / "config.json"
    return index.is_file() and config.is_file() and read_json(config).get("_class_name") == COND_UNET
