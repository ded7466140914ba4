"""Helpers for the distillation tests: tiny configs, in-process runs, subprocess environments."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from distill.engine.config import parse_overrides
from distill.engine.run_config import load_run_config
from distill.engine.train import train
from students import build_student
from teachers import load_teacher

ROOT = Path(__file__).resolve().parents[1]
RING8 = ROOT / "configs" / "distill" / "cd_ring8.yaml"
TINY = ["student.model.hidden=32", "student.model.layers=1", "objective.num_scales=6", "batch_size=32", "max_steps=12",
        "checkpoint_every=4", "log_every=2"]


def tiny_cfg(out: Path, *overrides: str, config: Path = RING8):
    return load_run_config(config, parse_overrides([*TINY, *overrides, f"output_dir={out}"]))


def run(cfg, **kw):
    return train(cfg, load_teacher=load_teacher, build_student=kw.pop("build_student", build_student),
                 log=kw.pop("log", lambda m: None), **kw)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def same_tensors(a: Path, b: Path) -> bool:
    x, y = tensors(a), tensors(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def subprocess_env() -> dict[str, str]:
    """The worktree first on the import path, and this process's thread count (bit-identical float math)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    return env
