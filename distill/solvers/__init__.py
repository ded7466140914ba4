"""Training-free solvers: small stateless functions over an explicit time grid, and a registry.

``SOLVERS[name].fn(denoiser, x_T, ts, *, schedule, cond=None, callback=None, **options) -> x_0``;
``sample(model, noise, solver=..., nfe=...)`` is the entry point most code wants.
"""

from distill.solvers import amed, basic, deis, dpm, dpm_v3, ipndm, stochastic, unipc  # noqa: F401  (registers the solvers)
from distill.solvers.registry import SOLVERS, SolverSpec, get_solver, register
from distill.solvers.sampling import per_sample_noise, per_sample_noises, sample

__all__ = ["SOLVERS", "SolverSpec", "get_solver", "register", "per_sample_noise", "per_sample_noises", "sample"]
