"""Student files: one safetensors file whose string metadata says how to rebuild and sample the student.

Metadata keys (all strings; JSON where structured): ``format`` (= ``FORMAT``), ``format_version``,
``network_class`` and ``network_config`` (rebuild the network), ``parameterization``, ``prediction_type``,
``sigma_data``, ``time_scale``, ``schedule`` (``Schedule.config()``), ``sampling_timesteps`` (1-4 steps),
``teacher``, ``teacher_hash``, ``training_config`` (the run's config), ``lora`` (null once merged), ``sampler``
(``consistency`` | ``ode``) and ``sampler_solver``, ``extra_conditions`` (embedded scalar inputs), ``lineage``
(the parent file and its sha256 when the run started from one).
``students.load_student(path)`` reads them back. Files are written to a temporary name and renamed
(``distill.core.atomic``: a full disk leaves the old file and raises ``OutputWriteError``). The diffusers
pipeline folder of a UNet student is written by ``students.diffusers_export``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distill.core.atomic import write_with
from distill.core.safe_files import parse_json
from distill.engine.checkpoint import latest_valid_checkpoint, skipped_messages
from distill.engine.lora import has_lora, merged_copy

FORMAT = "fewstep-distill/student"
FORMAT_VERSION = "1"
REQUIRED = ("network_class", "network_config", "parameterization", "prediction_type", "schedule", "sampling_timesteps")
# metadata keys whose values are JSON text (checked on reading, so a damaged one is named, not met as a bare parse error)
JSON_KEYS = ("network_config", "schedule", "sampling_timesteps", "null_class_label", "lora", "extra_conditions",
             "training_config", "data_shape", "num_classes", "sampling_search", "lineage", "training_cost", "selection")
STUDENT_FILE, EMA_FILE = "student.safetensors", "student_ema.safetensors"
CONDITION_PREFIX = "extra_conditions."  # state keys of the student's extra-condition embeddings (SLAM's gamma, w)


def network_config(net) -> dict:
    return {k: v for k, v in dict(net.config).items() if not k.startswith("_")}


def save_student(student, path: str | Path, *, merge_lora: bool = True, training_config: dict | None = None) -> Path:
    """Write ``student`` (a ``students.Student``) to ``path``; LoRA adapters are merged unless ``merge_lora=False``."""
    from safetensors.torch import save_file

    net, lora = student.net, student.info.get("lora") if has_lora(student.net) else None
    if lora and merge_lora:
        net, lora = merged_copy(net), None
    state = {k: v.detach().cpu().clone().contiguous() for k, v in net.state_dict().items()}
    state.update({CONDITION_PREFIX + k: v.detach().cpu().clone().contiguous() for k, v in student.conditions.state_dict().items()})
    meta = {**student.metadata(), "format": FORMAT, "format_version": FORMAT_VERSION,
            "network_class": type(net).__name__, "network_config": json.dumps(network_config(net), default=list),
            "lora": json.dumps(lora), "training_config": json.dumps(training_config or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_with(path, lambda tmp: save_file(state, str(tmp), metadata=meta))  # atomic (distill.core.atomic)


def read_student_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a student file, or one clear sentence saying why it cannot be used."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"student file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated headers and data
        raise ValueError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt: {e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} has no {FORMAT} metadata: it was not written by distill.engine.export "
                         f"(export a run with scripts/export.py)")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"{str(path)!r} lacks student metadata keys {missing}")
    for key in JSON_KEYS:
        if key in meta:
            parse_json(meta[key], f"the {key!r} metadata field of student file {str(path)!r}")
    return state, meta


def resolve_student_file(src: str | Path, ema: bool = False, log=None) -> Path:
    """The student file of a run folder (its final file, else its latest valid checkpoint; ``log`` gets one
    sentence per newer checkpoint skipped as damaged), of a checkpoint folder, or ``src`` itself when it is a file."""
    src, name = Path(src), EMA_FILE if ema else STUDENT_FILE
    if src.is_file():
        return src
    if (src / name).is_file():
        return src / name
    ckpt, skipped = latest_valid_checkpoint(src / "checkpoints")
    for message in skipped_messages(skipped) if log else ():
        log(message)
    if ckpt is not None and (ckpt / name).is_file():
        return ckpt / name
    what = "EMA student" if ema else "student"
    raise FileNotFoundError(f"no {what} file in {str(src)!r}: expected {name} in a run folder, in a complete checkpoint "
                            f"under checkpoints/, or in a checkpoint folder")
