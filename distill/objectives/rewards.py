"""Rewards for preference fine-tuning (``pso_online``): ``reward(x, cond) -> [B]`` on samples in [-1, 1], higher
is better. Registered by name; ``get_reward(name, **options)`` builds one.

  * ``class_confidence``: a classifier's softmax probability of the requested class (the sample's label, or the option
    ``reward_class`` when unconditional); the option ``classifier`` passes the network (logits of [B, 1, 16, 16] samples
    in [-1, 1]), by default the committed mnist16 classifier (``distill.core.nets.load_classifier``);
  * ``mean_ink``: mean pixel intensity mapped to [0, 1] (``distill.data.mean_ink``, a stroke-thickness statistic).

``sign`` -1 turns any reward into its opposite (``mean_ink`` with sign -1 prefers thin strokes).
"""

from __future__ import annotations

from typing import Callable

import torch

from distill.core.nets import load_classifier
from distill.data import mean_ink

Reward = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
CLASSIFIER_CLASSES = 10  # the committed mnist16 classifier's 10-way head: class_confidence's classes 0..9
REWARDS: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str):
    def add(factory):
        REWARDS[name] = factory
        return factory

    return add


@register_reward("mean_ink")
def _mean_ink(reward_class: int | None = None) -> Reward:
    return lambda x, cond: mean_ink(x)


@register_reward("class_confidence")
def _class_confidence(reward_class: int | None = None, classifier: torch.nn.Module | None = None) -> Reward:
    classifier = classifier if classifier is not None else load_classifier()

    def reward(x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None and reward_class is None:
            raise ValueError("reward 'class_confidence' needs class labels or the option 'reward_class' (0-9) for an "
                             "unconditional student")
        target = torch.full((len(x),), reward_class, device=x.device) if cond is None else cond
        net = classifier.to(x.device)
        p = net(x.float().clamp(-1, 1)).softmax(1)
        return p.gather(1, target.long().clamp_min(0)[:, None]).squeeze(1)

    return reward


def get_reward(name: str, sign: float = 1.0, **options) -> Reward:
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; allowed: {', '.join(sorted(REWARDS))}")
    base = REWARDS[name](**options)
    return base if sign == 1 else (lambda x, cond: sign * base(x, cond))
