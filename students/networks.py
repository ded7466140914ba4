"""Student networks that are not a copy of the teacher: a time-conditioned MLP for vectors, a UNet2DModel.

``NETWORKS`` maps the ``student.arch`` names to builders ``(data_shape, num_class_embeds, **kwargs) ->
module``; every module takes ``(x, t, class_labels)`` and has a ``config`` mapping that rebuilds it.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class TimeMLP(nn.Module):
    """x [B, dim], t [B] -> output [B, dim]: residual SiLU MLP with sinusoidal time features (DDPM, Ho et al.
    2020) and an optional class embedding. Plain torch, so 2-D runs never import diffusers."""

    def __init__(self, dim: int = 2, hidden: int = 128, layers: int = 3, time_features: int = 64,
                 num_class_embeds: int | None = None, time_scale: float = 1.0):
        super().__init__()
        self.config = {"dim": dim, "hidden": hidden, "layers": layers, "time_features": time_features,
                       "num_class_embeds": num_class_embeds, "time_scale": time_scale}
        self.inp = nn.Linear(dim + time_features, hidden)
        self.class_emb = nn.Embedding(num_class_embeds, hidden) if num_class_embeds else None
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(layers))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x, t, class_labels=None):
        t = torch.as_tensor(t, device=x.device).float().expand(x.shape[0]) * self.config["time_scale"]
        half = self.config["time_features"] // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=x.device) / half)
        emb = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], 1).to(x.dtype)
        h = self.inp(torch.cat([x, emb], 1))
        if self.class_emb is not None:
            h = h + self.class_emb(class_labels)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


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
