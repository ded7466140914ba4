"""A small time- and class-conditioned MLP for 2-D toy data, saved and loaded like a diffusers model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class ToyMLPOutput(BaseOutput):
    sample: torch.Tensor


class ToyMLP(ModelMixin, ConfigMixin):
    """x [B, dim], t [B] -> prediction [B, dim]; sinusoidal time features as in DDPM (Ho et al. 2020)."""

    @register_to_config
    def __init__(self, dim: int = 2, hidden: int = 256, layers: int = 3, time_features: int = 64,
                 num_class_embeds: int | None = None, time_scale: float = 1.0):
        super().__init__()
        self.time_features = time_features
        self.inp = nn.Linear(dim + time_features, hidden)
        self.class_emb = nn.Embedding(num_class_embeds, hidden) if num_class_embeds else None
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(layers))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x, timestep, class_labels=None) -> ToyMLPOutput:
        t = torch.as_tensor(timestep, device=x.device).float().expand(x.shape[0]) * self.config.time_scale
        half = self.time_features // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=x.device) / half)
        emb = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], 1).to(x.dtype)
        h = self.inp(torch.cat([x, emb], 1))
        if self.class_emb is not None:
            h = h + self.class_emb(class_labels)
        for block in self.blocks:
            h = h + block(h)
        return ToyMLPOutput(sample=self.out(h))
