"""Student networks that are not a copy of the teacher: a time-conditioned MLP for vectors, a UNet2DModel.

``NETWORKS`` maps the ``student.arch`` names to builders ``(data_shape, num_class_embeds, **kwargs) ->
module``; every module takes ``(x, t, class_labels)`` and has a ``config`` mapping that rebuilds it.
"""

from __future__ import annotations

from torch import nn

from distill.nets import TimeMLP


def _mlp(data_shape, num_class_embeds, **kwargs):
    if len(data_shape) != 1:
        raise ValueError(f"student arch 'mlp' is for vector data; the teacher's data shape is {list(data_shape)} (use 'unet')")
    return TimeMLP(dim=data_shape[0], num_class_embeds=num_class_embeds, **kwargs)


def _unet(data_shape, num_class_embeds, **kwargs):
    from diffusers import UNet2DModel  # seconds to import: only when a UNet is asked for

    if len(data_shape) != 3:
        raise ValueError(f"student arch 'unet' is for images [C, H, W]; the teacher's data shape is {list(data_shape)}")
    base = {"sample_size": data_shape[1], "in_channels": data_shape[0], "out_channels": data_shape[0]}
    return UNet2DModel(num_class_embeds=num_class_embeds, **{**base, **kwargs})


def _unet_from_config(config: dict):
    from diffusers import UNet2DModel

    return UNet2DModel.from_config(config)


def _toy_mlp_from_config(config: dict):
    from teachers.toy_mlp import ToyMLP  # a copy of an MLP teacher

    return ToyMLP.from_config(config)


NETWORKS = {"mlp": _mlp, "unet": _unet}
# class name -> rebuild from the ``config`` stored in a student file
FROM_CONFIG = {"TimeMLP": lambda c: TimeMLP(**c), "UNet2DModel": _unet_from_config, "ToyMLP": _toy_mlp_from_config}


def network_from_config(class_name: str, config: dict) -> nn.Module:
    if class_name not in FROM_CONFIG:
        raise ValueError(f"unknown student network class {class_name!r}; allowed: {', '.join(FROM_CONFIG)}")
    return FROM_CONFIG[class_name](config)
