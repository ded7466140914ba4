"""Files that prepare a teacher for a fast sampler (Gaussian fit, DPM-Solver-v3 statistics, AMED predictor, GITS
grid), each tied to the teacher it was made from by the teacher's content hash.

Every such file is a safetensors file (or JSON for grids) whose metadata holds ``kind`` and ``teacher_hash``;
``check_teacher`` refuses a file made from another teacher in one sentence. ``default_path`` is where the
scripts put them: ``runs/prepared/<teacher hash[:16]>/<kind>.<ext>``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distill.core.atomic import write_text, write_with

KINDS = ("gaussian", "ems", "amed", "gits")
ROOT = Path("runs/prepared")


def default_path(kind: str, teacher, root: str | Path = ROOT) -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown prepared-file kind {kind!r}; allowed: {', '.join(KINDS)}")
    return Path(root) / teacher.hash[:16] / (f"{kind}.json" if kind == "gits" else f"{kind}.safetensors")


def check_teacher(meta: dict, teacher, path, kind: str) -> None:
    """One clear sentence when ``path`` is not a ``kind`` file made from ``teacher``."""
    if meta.get("kind") != kind:
        raise ValueError(f"{str(path)!r} is a {meta.get('kind')!r} file, not a {kind!r} file")
    if teacher is not None and meta.get("teacher_hash") != teacher.hash:
        raise ValueError(f"the {kind} file {str(path)!r} was made from teacher {str(meta.get('teacher_hash'))[:12]}, not from "
                         f"{teacher.name!r} ({teacher.hash[:12]}); remake it for this teacher")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """safetensors with string metadata, written to a temp file and renamed (atomic: ``distill.core.atomic``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, meta = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, {k: str(v) for k, v in meta.items()}
    write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_tensors(path: str | Path, kind: str, teacher=None) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the {kind} file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated or not safetensors
        raise ValueError(f"the {kind} file {str(path)!r} is truncated or not a safetensors file ({e})") from None
    check_teacher(meta, teacher, path, kind)
    return tensors, meta


def save_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(data, indent=1))


def load_json(path: str | Path, kind: str, teacher=None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the {kind} file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the {kind} file {str(path)!r} is not valid JSON ({e})") from None
    check_teacher(data, teacher, path, kind)
    return data


def teacher_data(teacher, data: str | None, split: str = "train", n: int = 20_000, seed: int = 0, unconditional: bool = False):
    """(x0 [N, ...], labels [N] or None) to prepare ``teacher`` with: exact samples of an analytic teacher (``data``
    None), or a dataset from ``distill.data`` (mnist16, hf:<name or folder>). Labels go with a class-conditional
    teacher unless ``unconditional``."""
    if data is None:
        if not hasattr(teacher, "sample_data"):
            raise ValueError(f"teacher {teacher.name!r} has no exact sampler: name a dataset with --data (mnist16, hf:<name or folder>)")
        g = torch.Generator().manual_seed(seed)
        cond = None
        if teacher.num_classes and not unconditional:
            cond = torch.randint(0, teacher.num_classes, (n,), generator=g)
        return teacher.sample_data(n, g, cond=cond), cond
    from distill.data import dataset_tensors, load_dataset

    options = {}
    if data.startswith("hf:"):
        options = {"resolution": teacher.data_shape[-1], "channels": teacher.data_shape[0]}
    x0, labels = dataset_tensors(load_dataset(data, split, **options))
    if tuple(x0.shape[1:]) != tuple(teacher.data_shape):
        raise ValueError(f"dataset {data!r} has samples of shape {list(x0.shape[1:])}; teacher {teacher.name!r} makes "
                         f"{list(teacher.data_shape)}")
    use_labels = teacher.num_classes and not unconditional
    if use_labels and bool((labels < 0).any()):
        raise ValueError(f"dataset {data!r} has unlabelled samples; the class-conditional teacher needs labels (or --unconditional)")
    return x0, (labels if use_labels else None)
