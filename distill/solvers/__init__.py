"""Training-free solvers: small stateless functions over an explicit time grid, and a registry.

``SOLVERS[name].fn(denoiser, x_T, ts, *, schedule, cond=None, callback=None, **options) -> x_0``;
``sample(model, noise, solver=..., nfe=...)`` is the entry point most code wants.
"""

from distill.solvers import basic, deis, dpm, ipndm, stochastic, unipc  # noqa: F401  (registers the solvers)
from distill.solvers.prepared.amed import solver as _amed  # noqa: F401  (registers amed, euler_amed, dpmpp_2m_amed)
from distill.solvers.prepared.dpm_v3 import solver as _dpm_v3  # noqa: F401  (registers dpm_solver_v3)
from distill.solvers.registry import SOLVERS, SolverSpec, get_solver, register
from distill.solvers.sampling import per_sample_noise, per_sample_noises, sample

__all__ = ["SOLVERS", "SolverSpec", "get_solver", "register", "per_sample_noise", "per_sample_noises", "sample"]
