"""Distillation objectives: one module per family, all behind ``distill.objectives.base.Objective``."""

# imported for their side effect: each module registers its objectives
from distill.objectives import (  # noqa: F401
    adversarial,
    consistency,
    diffusion,
    distribution_matching,
    f_divergence,
    kd,
    meanflow,
    progressive,
    pso,
    reflow,
    scm,
    slam,
)
from distill.objectives.base import OBJECTIVES, Batch, Network, Objective, get_objective, register_objective, unwrap

__all__ = ["OBJECTIVES", "Batch", "Network", "Objective", "get_objective", "register_objective", "unwrap"]
