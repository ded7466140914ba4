"""Check the bench's FID spread on mnist16: one solver cell on several fresh noise-seed sets against its bootstrap.

    OMP_NUM_THREADS=1 python scripts/spread_check.py dpmpp_2m 4 2000 8

Seed set k uses noise seeds k*N..(k+1)*N-1 (set 0 is the bench's cell), labels i mod 10, the bench's grid
(uniform, direct final step) and reference; prints each set's FID and, for the first three sets, the bootstrap
spread with and without keeping the class counts fixed (``bootstrap_fid_std(..., strata=labels)``).
"""

from __future__ import annotations

import torch

from distill.eval.fid import bootstrap_fid_std, compute_features, feature_statistics, frechet_distance
from distill.solvers import per_sample_noise, sample


def cell_features(teacher, solver: str, nfe: int, seeds: range, labels: torch.Tensor, batch: int = 500) -> torch.Tensor:
    noise = per_sample_noise(teacher.data_shape, seeds)
    with torch.inference_mode():
        x = torch.cat([sample(teacher, noise[i:i + batch], solver=solver, nfe=nfe, grid="uniform", final="direct",
                              cond=labels[i:i + batch]) for i in range(0, len(noise), batch)])
    return compute_features(x)


def spread_check(teacher, reference: torch.Tensor, solver: str, nfe: int, n: int, sets: int, log=print) -> list[float]:
    """FID of one solver cell on ``sets`` disjoint noise-seed sets of ``n`` samples against ``reference`` images; logs each
    set's FID and, for the first three sets, the bootstrap spread with and without fixed class counts."""
    ref = compute_features(reference)
    stats, labels = feature_statistics(ref), torch.arange(n) % 10
    fids = []
    for k in range(sets):
        f = cell_features(teacher, solver, nfe, range(k * n, (k + 1) * n), labels)
        fids.append(frechet_distance(*feature_statistics(f), *stats))
        boot = (f"; bootstrap std {bootstrap_fid_std(f, ref, seed=k):.3f}, with fixed class counts "
                f"{bootstrap_fid_std(f, ref, seed=k, strata=labels):.3f}") if k < 3 else ""
        log(f"seed set {k}: FID {fids[-1]:.3f}{boot}")
    log(f"{solver} at {nfe} NFE, {n} samples: std of FID over {sets} seed sets {torch.tensor(fids).std():.3f}")
    return fids
