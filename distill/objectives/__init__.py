"""Distillation objectives: one module per family, all behind ``distill.objectives.base.Objective``."""

from distill.objectives import consistency, diffusion, distribution_matching, progressive, pso, reflow, slam  # noqa: F401  (registers the objectives)
from distill.objectives.base import OBJECTIVES, Batch, Network, Objective, get_objective, register_objective, unwrap

__all__ = ["OBJECTIVES", "Batch", "Network", "Objective", "get_objective", "register_objective", "unwrap"]
