"""The solver registry: name -> SolverSpec (function, NFE accounting, order)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

SOLVERS: dict[str, "SolverSpec"] = {}
SHARED_ARGS = ("schedule", "cond", "callback")  # what sample() gives every solver function by name


def _one_per_step(steps: int, clean_final: bool) -> int:
    return steps


@dataclass(frozen=True)
class SolverSpec:
    name: str
    fn: Callable  # fn(denoiser, x_T, ts, *, schedule, cond=None, callback=None, **options) -> x_0
    order: int  # global order of accuracy of the deterministic method
    nfe: Callable[[int, bool], int] = _one_per_step  # NFE of a `steps`-step solve (clean_final: last step denoises)
    stochastic: bool = False
    needs: str = ""  # an option without a default (a prepared file): left out of the bench's "all"
    # sample() options under which the solver works when t_max lies at an extreme noise level (e.g. sigma/alpha ~ 2e4 of
    # a squared-cosine DiscreteVP): the bench's tables name them next to the uniform-grid cells, which they explain
    recommended: tuple = ()

    @property
    def options(self) -> tuple[str, ...]:
        """The solver's own named options (``sample(..., **options)``): its function's keyword-only arguments but
        ``SHARED_ARGS``, e.g. ``ems`` and ``order`` of dpm_solver_v3, ``amed`` of the AMED solvers."""
        params = inspect.signature(self.fn).parameters.values()
        return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in SHARED_ARGS)

    def steps_for_nfe(self, nfe: int, clean_final: bool) -> int:
        """The number of steps that spends exactly ``nfe`` evaluations, or a clear error."""
        if nfe < 1:
            raise ValueError(f"nfe must be at least 1, got {nfe}")
        for steps in range(1, nfe + 1):
            if self.nfe(steps, clean_final) == nfe:
                return steps
        possible = sorted({self.nfe(s, clean_final) for s in range(1, nfe + 2)})
        near = [n for n in possible if abs(n - nfe) <= 2] or possible[:3]
        ending = "a last step onto clean data" if clean_final else "a grid ending at t_min"
        raise ValueError(f"solver {self.name!r} cannot spend exactly {nfe} NFE with {ending}; nearest possible: {near}")


def register(name: str, *, order: int, nfe: Callable[[int, bool], int] = _one_per_step, stochastic: bool = False,
             needs: str = "", recommended: tuple = ()):
    """Decorator adding a solver function to ``SOLVERS`` under ``name``."""

    def deco(fn):
        if name in SOLVERS:
            raise ValueError(f"solver {name!r} is already registered")
        SOLVERS[name] = SolverSpec(name, fn, order, nfe, stochastic, needs, recommended)
        return fn

    return deco


def get_solver(name: str) -> SolverSpec:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; valid solvers: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[name]
