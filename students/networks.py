"""Student networks that are not a copy of the teacher: a time-conditioned MLP for vectors, a UNet2DModel.

``NETWORKS`` maps the ``student.arch`` names to builders ``(data_shape, num_class_embeds, **kwargs) ->
module``; every module takes ``(x, t, class_labels)`` and has a ``config`` mapping that rebuilds it.
"""

from __future__ import annotations

import inspect

from torch import nn

from distill.core.nets import TimeMLP


def check_model_keys(arch: str, cls, kwargs: dict, fixed: tuple[str, ...]) -> None:
    """``student.model`` keys that ``cls.__init__`` does not take (or that the builder sets) -> one sentence."""
    params = inspect.signature(cls.__init__).parameters
    allowed = sorted(k for k, p in params.items() if k != "self" and k not in fixed and p.kind is p.POSITIONAL_OR_KEYWORD)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"unknown student.model key(s) {', '.join(unknown)} for student arch {arch!r} "
                         f"({cls.__name__}); allowed: {', '.join(allowed)}")


def _mlp(data_shape, num_class_embeds, **kwargs):
    if len(data_shape) != 1:
        raise ValueError(f"student arch 'mlp' is for vector data; the teacher's data shape is {list(data_shape)} (use 'unet')")
    check_model_keys("mlp", TimeMLP, kwargs, fixed=("dim", "num_class_embeds"))
    return TimeMLP(dim=data_shape[0], num_class_embeds=num_class_embeds, **kwargs)


def _unet(data_shape, num_class_embeds, **kwargs):
    from diffusers import UNet2DModel  # seconds to import: only when a UNet is asked for

    if len(data_shape) != 3:
        raise ValueError(f"student arch 'unet' is for images [C, H, W]; the teacher's data shape is {list(data_shape)}")
    check_model_keys("unet", UNet2DModel, kwargs, fixed=("num_class_embeds",))
    base = {"sample_size": data_shape[1], "in_channels": data_shape[0], "out_channels": data_shape[0]}
    return UNet2DModel(num_class_embeds=num_class_embeds, **{**base, **kwargs})


def _toy_mlp(data_shape, num_class_embeds, **kwargs):
    from teachers.toy_mlp import ToyMLP  # the mlp with diffusers' save_pretrained: a toy teacher's network

    if len(data_shape) != 1:
        raise ValueError(f"student arch 'toy_mlp' is for vector data; the teacher's data shape is {list(data_shape)} (use 'unet')")
    check_model_keys("toy_mlp", ToyMLP, kwargs, fixed=("dim", "num_class_embeds"))
    return ToyMLP(dim=data_shape[0], num_class_embeds=num_class_embeds, **kwargs)


def _unet_from_config(config: dict):
    from diffusers import UNet2DModel

    return UNet2DModel.from_config(config)


def _cond_unet_from_config(config: dict):
    from diffusers import UNet2DConditionModel  # a copy of a text-to-image teacher's UNet

    return UNet2DConditionModel.from_config(config)


def _toy_mlp_from_config(config: dict):
    from teachers.toy_mlp import ToyMLP  # a copy of an MLP teacher

    return ToyMLP.from_config(config)


NETWORKS = {"mlp": _mlp, "unet": _unet, "toy_mlp": _toy_mlp}
# class name -> rebuild from the ``config`` stored in a student file
FROM_CONFIG = {"TimeMLP": lambda c: TimeMLP(**c), "UNet2DModel": _unet_from_config,
               "UNet2DConditionModel": _cond_unet_from_config, "ToyMLP": _toy_mlp_from_config}


def network_from_config(class_name: str, config: dict) -> nn.Module:
    if class_name not in FROM_CONFIG:
        raise ValueError(f"unknown student network class {class_name!r}; allowed: {', '.join(FROM_CONFIG)}")
    return FROM_CONFIG[class_name](config)
