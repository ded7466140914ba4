"""Network roles an objective can ask the engine for (``distill.objectives.base.Context``).

  * ``teacher_copy``: a trainable (or frozen) ``NetDenoiser`` copy of the teacher's network, e.g. the fake
    score of VSD / DMD / f-distill, initialised from the teacher (Wang et al. 2023; Yin et al. 2024);
  * ``module_copy``: a copy of any module (the student's EMA target, PSO's frozen reference);
  * ``discriminator_head``: a small head on a denoiser network's bottleneck features -> one logit per sample
    (DMD2's GAN classifier on the fake-score encoder, Yin et al. 2024b, Sec. 4.3);
  * ``lora_disabled``: a context in which a LoRA-injected network computes its frozen base network.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn


def module_copy(module: nn.Module, trainable: bool) -> nn.Module:
    out = copy.deepcopy(module).float()
    return out.train().requires_grad_(True) if trainable else out.eval().requires_grad_(False)


def teacher_copy(teacher, trainable: bool = True) -> nn.Module:
    model = getattr(teacher, "model", None)
    if model is None:
        raise ValueError(f"teacher {teacher.name!r} has no network to copy (an analytic teacher); objectives with a "
                         f"fake-score network need a network teacher (a diffusers folder, a zoo name or student:<file>)")
    return module_copy(model, trainable)


def _probe_features(net: nn.Module, data_shape) -> torch.Tensor:
    """Bottleneck activations of one call on zeros at t_max (labels: the null class, else class 0; a cross-attention
    network: one zero prompt token)."""
    from distill.core.conditioning import PromptCond
    from distill.core.denoisers import cross_attention_dim

    p = next(net.parameters())
    x = torch.zeros((1, *data_shape), dtype=p.dtype, device=p.device)
    t = torch.full((1,), float(net.schedule.t_max), dtype=torch.float64, device=p.device)
    dim = cross_attention_dim(net.net)
    if dim is not None:
        token = torch.zeros((1, 1, dim), dtype=p.dtype, device=p.device)
        with torch.no_grad():
            return net.features(x, t, PromptCond(token, token))[1]
    label = torch.full((1,), -1 if net.null_class_label is not None else 0, device=p.device)
    with torch.no_grad():
        try:
            return net.features(x, t, None)[1]
        except (ValueError, TypeError, RuntimeError):  # a class-conditional network wants labels
            return net.features(x, t, label)[1]


class DiscriminatorHead(nn.Module):
    """Bottleneck features [B, C, H, W] or [B, C] -> one logit per sample [B]."""

    def __init__(self, feature_shape: tuple[int, ...], hidden: int = 64):
        super().__init__()
        channels = feature_shape[0]
        if len(feature_shape) == 3:
            self.body = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(hidden, 1))
        else:
            self.body = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.body(features.float()).squeeze(1)


def discriminator_head(net: nn.Module, data_shape, hidden: int = 64) -> DiscriminatorHead:
    """A fresh head sized for ``net``'s bottleneck (``net``: a ``NetDenoiser``, e.g. the fake score)."""
    return DiscriminatorHead(tuple(_probe_features(net, data_shape).shape[1:]), hidden)


@contextlib.contextmanager
def lora_disabled(net: nn.Module):
    """Inside, every PEFT LoRA layer of ``net`` is bypassed (the frozen base network answers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield net
    finally:
        for layer in layers:
            layer.enable_adapters(True)
