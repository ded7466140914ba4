"""Distance to the teacher at large N (issue #31): distillation fidelity is how far the student's distribution is from
the teacher's, and teacher samples are free where real data is scarce (mnist16 has ~5,000 digits; a student or the
teacher samples 20,000 in minutes). An entry's samples (``distill.eval.paired.Entry``, drawn as its bench cell) are
measured with the bench's FID features against the converged teacher's samples at the same N:

  * ``fd_teacher``: the Frechet distance between the two feature sets (Heusel et al. 2017, Eq. 6, on teacher samples
    instead of data), with precision and recall against the teacher's samples (Kynkaanniemi et al. 2019, k = 3);
  * the floor: the teacher against itself on disjoint noise seeds at the same N, the distance no entry can go below
    in expectation (the finite-N bias of FD is of the same size for every row).

The teacher's reference features are generated once and cached under a hash of (teacher, solver, NFE, seeds, sample
count, labels, grid, final step, guidance, feature extractor), as safetensors (no file read here can run code)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from distill.core.atomic import write_with
from distill.eval.bench.cells import Cell, generate
from distill.eval.bench.config import BenchConfig
from distill.eval.fid import bootstrap_fid_std, feature_metrics


def reference_key(teacher, cfg: BenchConfig, metric, solver: str, nfe: int, seed: int, num_samples: int) -> str:
    """The cache key of a teacher reference: everything that changes its samples or their features."""
    spec = {"teacher": getattr(teacher, "hash", teacher.name), "solver": solver, "nfe": nfe, "seed": seed, "n": num_samples,
            "unconditional": cfg.unconditional, "prompts": cfg.prompts, "grid": cfg.grid, "final": cfg.final,
            "guidance": cfg.guidance_scale, "extractor": metric.extractor, "weights": str(metric.weights_path)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def cached_features(cache_dir: Path | None, prefix: str, key: str, meta: dict, what: str, make, log=print) -> torch.Tensor:
    """Features cached as ``cache_dir/<prefix>-<key>.safetensors``: read when there and readable, else ``make()``-d and
    written atomically (an interrupted run leaves no partial file); ``cache_dir`` None: always made, never written."""
    path = None if cache_dir is None else Path(cache_dir) / f"{prefix}-{key}.safetensors"
    if path is not None and path.is_file():
        try:
            return load_file(str(path))["features"]
        except Exception as e:  # noqa: BLE001  (any damage: make them again)
            log(f"note: feature cache {path} is unreadable ({type(e).__name__}); sampling {what} again")
    features = make().contiguous()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"key": key, **{k: str(v) for k, v in meta.items()}}
        write_with(path, lambda tmp: save_file({"features": features}, str(tmp), metadata=meta))
    return features


def teacher_features(teacher, cfg: BenchConfig, metric, solver: str, nfe: int, seed: int, num_samples: int,
                     cache_dir: Path | None, log=print) -> torch.Tensor:
    """Features of ``num_samples`` teacher samples (``solver`` at ``nfe``, seeds seed..seed+N-1), from the cache when
    there (``cache_dir/teacher-<key>.safetensors``), else generated and cached."""
    key = reference_key(teacher, cfg, metric, solver, nfe, seed, num_samples)

    def make():
        return metric.features(generate(teacher, Cell(solver, "solver", nfe, nfe), replace(cfg, seed=seed, num_samples=num_samples))[0])

    meta = {"solver": solver, "nfe": nfe, "seed": seed, "num_samples": num_samples}
    return cached_features(cache_dir, "teacher", key, meta, f"the teacher's {solver} reference", make, log)


def teacher_referenced(features: torch.Tensor, reference: torch.Tensor, bootstrap: int = 50) -> dict:
    """FD to the teacher's samples, its bootstrap spread over the entry's samples, precision and recall against them."""
    out = feature_metrics(features, reference)
    return {"fd_teacher": out["fid"], "fd_teacher_std": bootstrap_fid_std(features, reference, resamples=bootstrap) if bootstrap else "",
            "precision_teacher": out["precision"], "recall_teacher": out["recall"]}


def check_disjoint(num_samples: int, seeds: dict[str, int]) -> None:
    """The seed ranges [s, s + N) of the entries, the reference and the floor must not overlap."""
    spans = sorted((s, name) for name, s in seeds.items())
    for (a, name_a), (b, name_b) in zip(spans, spans[1:]):
        if b < a + num_samples:
            raise ValueError(f"the {name_a} seeds {a}..{a + num_samples - 1} overlap the {name_b} seeds from {b}; allowed: "
                             f"seed starts at least --num-samples ({num_samples}) apart")
