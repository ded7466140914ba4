"""GITS: geometry-inspired time scheduling (Chen et al., ICML 2024, "On the Trajectory Regularity of ODE-based
Diffusion Sampling"). Training-free: a few warm-up teacher trajectories on a fine grid, the cost of every jump
i -> j of a first-order step measured against the trajectory, and a dynamic programme for the cheapest grid with
a given number of steps. The result is an explicit grid that any solver uses (``sample(..., grid=<file>)``).
"""

from __future__ import annotations

import itertools

import torch

from distill.core.grids import make_grid
from distill.solvers.common import ddim_step, grid_points
from distill.solvers.prepared import files as prepared
from distill.solvers.registry import get_solver

METRICS = ("l2", "l1")
COEFF = 1.15  # GITS' default weight of the cost still to come (gits_utils.py, ALGORITHMS.md 9.2)


def warmup_trajectories(denoiser, schedule, x_T, fine_ts, *, cond=None, solver: str = "ipndm"):
    """States x_i at every time of ``fine_ts`` (the last one is the solver's output) and the data predictions
    D(x_i, t_i) at every time but the last, from one solve (GITS: 60 iPNDM steps on a Karras rho = 7 grid)."""
    states, denoised = [], []

    def keep(info):
        states.append(info["x"])
        denoised.append(info["denoised"])

    out = get_solver(solver).fn(denoiser, x_T, fine_ts, schedule=schedule, cond=cond, callback=keep)
    return torch.stack([*states, out]), torch.stack(denoised)


def cost_matrix(states, denoised, schedule, fine_ts, metric: str = "l2") -> torch.Tensor:
    """C[i, j] (i < j): distance between the first-order (DDIM = Euler in EDM's chart) jump from the teacher's
    x_i to t_j and the teacher's x_j, averaged over samples (GITS Sec. 4, "cost matrix"); +inf for j <= i."""
    if metric not in METRICS:
        raise ValueError(f"unknown GITS metric {metric!r}; allowed: {', '.join(METRICS)}")
    pts = grid_points(schedule, fine_ts)
    n = len(pts)
    cost = torch.full((n, n), float("inf"), dtype=torch.float64)
    for i in range(n - 1):
        for j in range(i + 1, n):
            diff = (ddim_step(states[i], denoised[i], pts[i], pts[j]) - states[j]).flatten(1).double()
            per_sample = diff.abs().mean(-1) if metric == "l1" else diff.pow(2).mean(-1).sqrt()
            cost[i, j] = per_sample.mean()
    return cost


def path_cost(cost: torch.Tensor, path, coeff: float = COEFF) -> float:
    """sum_k coeff^k C[p_k, p_{k+1}]: the DP's objective, jump k weighted by coeff^k (unrolling GITS'
    V[j][k] = min_i C[j][i] + coeff V[i][k-1])."""
    return sum(coeff**k * float(cost[i, j]) for k, (i, j) in enumerate(zip(path[:-1], path[1:])))


def dp_search(cost: torch.Tensor, steps: int, coeff: float = COEFF) -> tuple[list[int], float]:
    """The path 0 = p_0 < ... < p_steps = n-1 of least ``path_cost``: V[i][1] = C[i][end],
    V[i][k] = min_j C[i][j] + coeff V[j][k-1] (GITS, Algorithm 1), then backtracking."""
    n = cost.shape[0]
    if not 1 <= steps <= n - 1:
        raise ValueError(f"steps must lie in 1..{n - 1} for a fine grid of {n} times, got {steps}")
    inf = float("inf")
    value = [[inf] * (steps + 1) for _ in range(n)]
    choice = [[-1] * (steps + 1) for _ in range(n)]
    for i in range(n - 1):
        value[i][1] = float(cost[i, n - 1])
    for k in range(2, steps + 1):
        for i in range(n - 1):
            for j in range(i + 1, n - 1):
                v = float(cost[i, j]) + coeff * value[j][k - 1]
                if v < value[i][k]:
                    value[i][k], choice[i][k] = v, j
    path, i = [0], 0
    for k in range(steps, 1, -1):
        i = choice[i][k]
        path.append(i)
    return path + [n - 1], value[0][steps]


def brute_force_search(cost: torch.Tensor, steps: int, coeff: float = COEFF) -> tuple[list[int], float]:
    """The same optimum by enumerating every path (for tests on small grids)."""
    n = cost.shape[0]
    best = min(([0, *mid, n - 1] for mid in itertools.combinations(range(1, n - 1), steps - 1)),
               key=lambda p: path_cost(cost, p, coeff))
    return best, path_cost(cost, best, coeff)


def fine_grid(schedule, fine_steps: int = 60, kind: str = "karras", final: str = "direct") -> torch.Tensor:
    """The warm-up grid (GITS: 61 times, Karras rho = 7), ending as the grids it will be searched for."""
    return make_grid(schedule, fine_steps, kind, final=final)


def save_grids(path, teacher, fine_ts, cost, steps_list, *, coeff: float, final: str, meta: dict) -> dict:
    grids = {}
    for steps in steps_list:
        idx, value = dp_search(cost, steps, coeff)
        grids[str(steps)] = {"ts": [float(fine_ts[i]) for i in idx], "index": idx, "cost": value}
    data = {"kind": "gits", "teacher_hash": teacher.hash, "teacher": teacher.name, "final": final, "coeff": coeff,
            "fine_ts": [float(t) for t in fine_ts], "grids": grids, **meta}
    prepared.save_json(path, data)
    return data


def load_grid(path, steps: int, final: str, teacher=None) -> torch.Tensor:
    """The searched grid for ``steps`` steps from a GITS file (made from ``teacher``, for grids ending ``final``)."""
    data = prepared.load_json(path, "gits", teacher)
    if data["final"] != final:
        raise ValueError(f"GITS file {path} holds grids ending final={data['final']!r}, not {final!r}")
    if str(steps) not in data["grids"]:
        raise ValueError(f"GITS file {path} has no grid for {steps} steps; it has {', '.join(sorted(data['grids'], key=int))}")
    return torch.tensor(data["grids"][str(steps)]["ts"], dtype=torch.float64)
