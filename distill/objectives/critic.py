"""The helper networks of the distribution-matching family: the fake score D_fake (a trainable copy of the teacher's
network, or a fresh ``TimeMLP`` for analytic teachers) with an optional discriminator head on bottleneck features, and
the discriminator's loss."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from distill.core.denoisers import NetDenoiser
from distill.engine.config import ConfigError


def mlp_fake_score(teacher, hidden: int, layers: int, num_classes: int) -> NetDenoiser:
    """A fresh ``TimeMLP`` v-prediction denoiser on the teacher's schedule (for teachers without a network)."""
    from distill.core.nets import TimeMLP

    if len(teacher.data_shape) != 1:
        raise ConfigError(f"objective.fake_score 'mlp' needs flat data; {teacher.name!r} has shape {list(teacher.data_shape)} "
                          f"(use teacher_copy)")
    net = TimeMLP(teacher.data_shape[0], hidden, layers, num_class_embeds=num_classes + 1 if num_classes else None,
                  time_scale=1000.0 / float(teacher.schedule.t_max))
    return NetDenoiser(net, teacher.schedule, "v_prediction", null_class_label=num_classes if num_classes else None)


class Critic(nn.Module):
    """The fake score D_fake and, for GAN objectives, a discriminator head: ``forward(x, t, cond)`` is D_fake;
    ``forward(..., logits=True)`` returns (D_fake, logit per sample) from one network call, the head reading the
    bottleneck of the fake score (or, with ``teacher_net``, of the frozen teacher: not a submodule)."""

    def __init__(self, score: NetDenoiser, head: nn.Module | None = None, teacher_net: nn.Module | None = None):
        super().__init__()
        self.score, self.head = score, head
        self._teacher_net = [teacher_net]  # a list: not registered, not checkpointed

    @property
    def schedule(self):
        return self.score.schedule

    @property
    def prediction_type(self):
        return self.score.prediction_type

    def forward(self, x, t, cond=None, *, raw: bool = False, logits: bool = False):
        if not logits:
            return self.score(x, t, cond, raw=raw)
        d, feats = self.score.features(x, t, cond)
        if self._teacher_net[0] is not None:
            feats = self._teacher_net[0].features(x, t, cond)[1]
        return d, self.head(feats)


class ChannelMeanHead(nn.Module):
    """SiDA's discriminator output (``sida_networks.py``, the encoder's ``return_flag='encoder'``): the mean over channels
    of the bottleneck features, one logit per location [B, H*W] ([B, 1] for flat features); no parameters."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f = features.float().mean(1)
        return f.flatten(1) if f.ndim > 1 else f[:, None]


def per_sample(v: torch.Tensor) -> torch.Tensor:
    """[B] as it is; a per-location [B, ...] (``ChannelMeanHead``) averaged over locations, as SiDA's BCE averages them."""
    return v.flatten(1).mean(1) if v.ndim > 1 else v


def discriminator_bce(l_real: torch.Tensor, l_fake: torch.Tensor) -> torch.Tensor:
    """Per-sample non-saturating BCE softplus(-l_real) + softplus(l_fake) (Goodfellow et al. 2014; DMD2, Eq. 4): at its
    optimum the logit is log p_t / q_t, the density ratio f-distill and Uni-Instruct read."""
    return per_sample(F.softplus(-l_real)) + per_sample(F.softplus(l_fake))
