"""A time- and class-conditioned MLP for 2-D toy data, saved and loaded like a diffusers model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from distill.core.nets import TimeMLP


@dataclass
class ToyMLPOutput(BaseOutput):
    sample: torch.Tensor


class ToyMLP(ModelMixin, ConfigMixin):
    """``distill.core.nets.TimeMLP`` with diffusers' save_pretrained / from_pretrained and UNet-style output."""

    @register_to_config
    def __init__(self, dim: int = 2, hidden: int = 256, layers: int = 3, time_features: int = 64,
                 num_class_embeds: int | None = None, time_scale: float = 1.0):
        super().__init__()
        self.mlp = TimeMLP(dim, hidden, layers, time_features, num_class_embeds, time_scale)

    def forward(self, x, timestep, class_labels=None) -> ToyMLPOutput:
        return ToyMLPOutput(sample=self.mlp(x, timestep, class_labels))
