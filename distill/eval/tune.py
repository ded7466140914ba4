"""Sampling times of a few-step student, chosen by a greedy search on a held-out score.

Multistep consistency sampling (Song et al. 2023, "Consistency Models", Algorithm 1) needs the times
t_1 = t_max > t_2 > ... > t_k at which the sample is re-noised; the paper picks them by a greedy search
on FID (Sec. 6). Here: t_1 = t_max; for each further step, every candidate time below the last chosen
one (or, when none is left, the log-SNR midpoint between it and t_min) is scored with the times chosen so
far plus that candidate, the best is kept, and the search is refined once at the midpoints (in log-SNR)
next to the winner. The k-step times are therefore a prefix of the (k + 1)-step times.

The score is any ``score(timesteps) -> float`` (lower is better); ``fid_score`` builds the usual one:
FID of the student's samples against a reference set through the workbench's extractor, on noise seeds
and a reference split that the benchmark does not use (mnist16: the ``tune`` split), so the tuning does not
fit the reported number.
"""

from __future__ import annotations

from typing import Callable

import torch

from distill.core.grids import spaced_times

Score = Callable[[list[float]], float]


def candidate_times(schedule, n: int = 16) -> list[float]:
    """``n`` decreasing candidate times strictly between ``t_max`` and ``t_min``, uniform in log-SNR."""
    if n < 1:
        raise ValueError(f"need at least 1 candidate time, got {n}")
    ts = spaced_times(schedule, n + 2, "logsnr", schedule.t_max, schedule.t_min)
    return [float(t) for t in ts[1:-1]]


def _midpoint(schedule, a: float, b: float) -> float:
    """The time halfway between ``a`` and ``b`` in log-SNR."""
    lam = schedule.lam(torch.tensor([a, b], dtype=torch.float64))
    return float(schedule.t_of_lam(lam.mean().reshape(1))[0])


def greedy_timesteps(schedule, max_steps: int, score: Score, candidates: list[float] | None = None,
                     refine: bool = True, log: Callable[[str], None] | None = None,
                     progress: bool = False, first: float | None = None) -> tuple[dict[int, list[float]], list[dict]]:
    """``({k: times of the k-step sample for k = 1..max_steps}, rows of every evaluation)``; ``progress`` shows a
    tqdm bar of the evaluations (each step k scores every candidate below the last chosen time, then up to 2 more).
    ``first`` is the 1-step time every schedule starts from (default ``t_max``; a generator trained at another input
    time, e.g. SiD's ``start_sigma``, keeps its own)."""
    from tqdm import tqdm

    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    candidates = sorted(candidate_times(schedule) if candidates is None else candidates, reverse=True)
    chosen, rows = [float(schedule.t_max if first is None else first)], []
    result = {1: list(chosen)}
    bar = tqdm(desc="sampling-time search", unit="FID", disable=not progress)

    def evaluate(k: int, t: float) -> float:
        value = float(score(chosen + [t]))
        rows.append({"steps": k, "timesteps": chosen + [t], "score": value})
        bar.update()
        bar.set_postfix(steps=k, score=f"{value:.4g}", refresh=False)
        if log:
            log(f"{k} steps, t = {[round(x, 2) for x in chosen + [t]]}: {value:.4g}")
        return value

    for k in range(2, max_steps + 1):
        # below the smallest candidate, the log-SNR midpoint between the last time and t_min is the one option
        options = [t for t in candidates if t < chosen[-1]] or [_midpoint(schedule, chosen[-1], float(schedule.t_min))]
        scores = {t: evaluate(k, t) for t in options}
        best = min(scores, key=scores.get)
        if refine:
            i = options.index(best)
            upper = chosen[-1] if i == 0 else options[i - 1]
            lower = options[i + 1] if i + 1 < len(options) else float(schedule.t_min)
            for t in (_midpoint(schedule, upper, best), _midpoint(schedule, best, lower)):
                if lower < t < upper and t not in scores:
                    scores[t] = evaluate(k, t)
            best = min(scores, key=scores.get)
        chosen.append(best)
        result[k] = list(chosen)
    bar.close()
    return result, rows


def fid_score(student, reference: torch.Tensor, *, num_samples: int, seed: int, labels: torch.Tensor | None = None,
              batch_size: int = 500) -> Score:
    """FID of ``num_samples`` student samples (noise seeds ``seed + i``, multistep noise from ``seed``)
    against ``reference`` (images in [-1, 1]) through the workbench's FID extractor."""
    from distill.eval.fid import compute_features, feature_statistics, frechet_distance
    from distill.solvers.sampling import per_sample_noise

    data_shape = tuple(reference.shape[1:])
    mu_ref, cov_ref = feature_statistics(compute_features(reference))
    noise = per_sample_noise(data_shape, range(seed, seed + num_samples), torch.float32)

    def score(timesteps: list[float]) -> float:
        g = torch.Generator().manual_seed(seed)
        out = []
        with torch.inference_mode():
            for start in range(0, num_samples, batch_size):
                cond = None if labels is None else labels[start:start + batch_size]
                out.append(student.sample(noise[start:start + batch_size], steps=len(timesteps), cond=cond,
                                          generator=g, timesteps=timesteps))
        x = torch.nan_to_num(torch.cat(out).float(), nan=0.0, posinf=1.0, neginf=-1.0)  # as the bench scores them
        mu, cov = feature_statistics(compute_features(x))
        return frechet_distance(mu, cov, mu_ref, cov_ref)

    return score
