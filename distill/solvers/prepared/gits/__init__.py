"""GITS (Chen et al., ICML 2024): ``search`` finds a time grid per step count for one teacher by dynamic programming
over a fine grid; ``distill.solvers.sample(grid=<file>)`` samples any solver on it."""
