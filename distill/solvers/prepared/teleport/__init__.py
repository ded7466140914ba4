"""Teleport: ``gaussian`` fits a Gaussian to the data once per teacher and jumps the high-noise part of the ODE in
closed form; ``distill.solvers.sample(teleport=..., handoff_sigma=...)`` hands over to any solver."""
