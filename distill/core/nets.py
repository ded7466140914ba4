"""Small networks shared by every layer (plain torch): the time-conditioned MLP of 2-D teachers and students, and the
mnist16 classifier that is both the FID feature extractor (``distill.eval.fid``) and a reward's judge
(``distill.objectives.rewards``)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn


class TimeMLP(nn.Module):
    """x [B, dim], t [B] -> output [B, out_dim or dim]: residual SiLU MLP with sinusoidal time features (DDPM, Ho et al.
    2020) and an optional class embedding. Plain torch, so 2-D runs never import diffusers."""

    def __init__(self, dim: int = 2, hidden: int = 128, layers: int = 3, time_features: int = 64,
                 num_class_embeds: int | None = None, time_scale: float = 1.0, out_dim: int | None = None):
        super().__init__()
        self.config = {"dim": dim, "hidden": hidden, "layers": layers, "time_features": time_features,
                       "num_class_embeds": num_class_embeds, "time_scale": time_scale, "out_dim": out_dim}
        self.inp = nn.Linear(dim + time_features, hidden)
        self.class_emb = nn.Embedding(num_class_embeds, hidden) if num_class_embeds else None
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(layers))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, out_dim or dim))  # out_dim: 2 dim for a 'both' output

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


DEFAULT_WEIGHTS = Path(__file__).resolve().parents[2] / "teachers" / "zoo" / "mnist16_classifier.safetensors"


class Mnist16Classifier(nn.Module):
    """Three conv layers (16 -> 8 -> 4 pixels), a 128-d feature layer, a 10-way head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.SiLU(),
        )
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, 128), nn.SiLU())
        self.head = nn.Linear(128, 10)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x in [-1, 1], [B, 1, 16, 16] -> [B, 128]."""
        return self.features(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def load_classifier(path: str | Path | None = None) -> Mnist16Classifier:
    from safetensors.torch import load_file

    path = Path(path or os.environ.get("MNIST16_CLASSIFIER", DEFAULT_WEIGHTS))
    if not path.is_file():
        raise FileNotFoundError(f"no mnist16 classifier weights at {path}; train them with scripts/train_classifier.py")
    model = Mnist16Classifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)
