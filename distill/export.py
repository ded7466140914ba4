"""Student files: one safetensors file whose string metadata says how to rebuild and sample the student.

Metadata keys (all strings; JSON where structured): ``format`` (= ``FORMAT``), ``format_version``,
``network_class`` and ``network_config`` (rebuild the network), ``parameterization``, ``prediction_type``,
``sigma_data``, ``time_scale``, ``schedule`` (``Schedule.config()``), ``sampling_timesteps`` (1-4 steps),
``teacher``, ``teacher_hash``, ``training_config`` (the run's config), ``lora`` (null once merged), ``sampler``
(``consistency`` | ``ode``) and ``sampler_solver``, ``extra_conditions`` (embedded scalar inputs), ``lineage``
(the parent file and its sha256 when the run started from one).
``students.load_student(path)`` reads them back. Files are written to a temporary name and renamed.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch

from distill.checkpoint import latest_valid_checkpoint, skipped_messages
from distill.lora import has_lora, merged_copy

FORMAT = "fewstep-distill/student"
FORMAT_VERSION = "1"
REQUIRED = ("network_class", "network_config", "parameterization", "prediction_type", "schedule", "sampling_timesteps")
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
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(state, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there when the write or the rename failed
    return path


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
        raise ValueError(f"{str(path)!r} has no {FORMAT} metadata: it was not written by distill.export "
                         f"(export a run with scripts/export.py)")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"{str(path)!r} lacks student metadata keys {missing}")
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


def diffusers_scheduler(student):
    """The ``FewStepScheduler`` that samples ``student`` in a diffusers pipeline."""
    from students.diffusers_scheduler import FewStepScheduler

    timesteps = {str(k): student.sampling_timesteps(k).tolist() for k in student.sampling_steps}
    return FewStepScheduler(schedule=student.schedule.config(), prediction_type=student.prediction_type,
                            time_scale=student.time_scale, parameterization=student.parameterization,
                            sigma_data=student.sigma_data, sampler=student.sampler, sampling_timesteps=timesteps)


PROMPT_COMPONENTS = ("vae", "text_encoder", "tokenizer")  # what a prompt student's pipeline folder takes from its teacher


def _takes_w(student) -> bool:
    """Whether the student takes the guidance scale through its UNet's ``timestep_cond`` input (LCM's w)."""
    from distill.denoisers import TimestepCondition

    return any(isinstance(c, TimestepCondition) for c in student.conditions.values())


def teacher_folder_of(student, teacher_folder: str | Path | None = None) -> Path:
    """The text-to-image teacher folder whose vae, text encoder and tokenizer a prompt student's pipeline folder copies:
    ``teacher_folder``, else the one the student file names; checked against the student's ``teacher_hash``."""
    from teachers.sd_pipeline import pipeline_hash

    root = Path(teacher_folder or student.info.get("teacher", ""))
    if not (root / "model_index.json").is_file() or not all((root / name).is_dir() for name in PROMPT_COMPONENTS):
        raise FileNotFoundError(f"a prompt-conditioned student's pipeline folder takes {', '.join(PROMPT_COMPONENTS)} from "
                                f"its teacher, but {str(root)!r} is not a pipeline folder with them: pass the teacher's "
                                f"folder (scripts/export.py --teacher DIR)")
    expected = student.info.get("teacher_hash")
    if expected and pipeline_hash(root) != expected:
        raise ValueError(f"{str(root)!r} is not the teacher this student was distilled from (its content hash differs); "
                         f"pass that teacher's folder (scripts/export.py --teacher DIR)")
    return root


def check_diffusers_exportable(student, teacher_folder: str | Path | None = None) -> None:
    """Raise ValueError / FileNotFoundError (one sentence) unless ``save_diffusers`` can save ``student``: call it before
    writing anything."""
    if not hasattr(student.net, "save_pretrained"):
        raise ValueError(f"only diffusers networks can be saved as a diffusers folder (--diffusers), not "
                         f"{type(student.net).__name__}")
    prompts = student.info.get("conditioning") == "prompts"
    foldable = set(_foldable_conditions(student)) if _bias_site(student.net) is not None else set()
    extra = [name for name in student.conditions
             if not (prompts and _takes_w(student) and name == "w") and name not in foldable]
    if extra:
        raise ValueError(f"a student with extra inputs ({', '.join(extra)}) that have no sampling default cannot be "
                         f"sampled by a stock diffusers pipeline, whose UNet call passes none; use students.load_student instead")
    if student.sampler == "ode" and student.sampler_solver != "euler":
        raise ValueError(f"the exported scheduler samples an ode student with DDIM (euler) steps, not "
                         f"{student.sampler_solver!r}; use students.load_student instead")
    if prompts:
        teacher_folder_of(student, teacher_folder)


def _foldable_conditions(student) -> dict:
    """Extra scalar inputs added to the time embedding that have a sampling default (SLAM's gamma = 1)."""
    from distill.denoisers import ScalarEmbedding

    return {name: emb for name, emb in student.conditions.items()
            if isinstance(emb, ScalarEmbedding) and emb.config.get("default") is not None}


def _bias_site(net):
    """The last bias of a diffusers UNet's time embedding when nothing follows it (no ``post_act``), else None."""
    site = getattr(net, "time_embedding", None)
    linear = getattr(site, "linear_2", None)
    return linear.bias if linear is not None and linear.bias is not None and site.post_act is None else None


def fold_default_conditions(student, net):
    """``net``, or a copy whose time-embedding output bias holds each foldable input's embedding at its default: the
    embedding is a constant added to that output (``NetDenoiser.add_condition``), so a stock pipeline, which passes no
    such input, computes what ``Student.sample`` computes at the default (up to float32 rounding of the sum)."""
    folded = _foldable_conditions(student)
    if not folded:
        return net
    net = copy.deepcopy(net)
    bias = _bias_site(net)
    with torch.no_grad():
        for emb in folded.values():
            bias += emb(torch.tensor([float(emb.config["default"])], device=bias.device))[0].to(bias.dtype)
    return net


def _prompt_pipeline_index(student, teacher_root: Path, net_class: str) -> dict:
    """model_index.json of a prompt student: LatentConsistencyModelPipeline when it takes w through ``timestep_cond``
    (the pipeline embeds guidance_scale - 1, as the student does), else StableDiffusionPipeline (call it with
    guidance_scale=1: the student is sampled without CFG)."""
    import diffusers

    teacher_index = json.loads((teacher_root / "model_index.json").read_text())
    pipeline = "LatentConsistencyModelPipeline" if _takes_w(student) else "StableDiffusionPipeline"
    return {"_class_name": pipeline, "_diffusers_version": diffusers.__version__,
            **{name: teacher_index[name] for name in PROMPT_COMPONENTS}, "unet": ["diffusers", net_class],
            "scheduler": ["students.diffusers_scheduler", "FewStepScheduler"], "safety_checker": [None, None],
            "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False}


def save_diffusers(student, folder: str | Path, teacher_folder: str | Path | None = None) -> Path:
    """Save a UNet student as a pipeline folder stock diffusers loads: ``unet/`` (LoRA merged), ``scheduler/`` (the
    project's ``FewStepScheduler``, which samples exactly as ``Student.sample``), ``model_index.json`` and
    ``student.json`` (the student file's metadata). A pixel student is a ``ConsistencyModelPipeline``; a
    prompt-conditioned one a ``LatentConsistencyModelPipeline`` (w through ``timestep_cond``) or a
    ``StableDiffusionPipeline``, with ``vae/``, ``text_encoder/`` and ``tokenizer/`` copied from its teacher's folder
    (``teacher_folder_of``). Extra inputs with a sampling default (SLAM's gamma) are folded into the UNet
    (``fold_default_conditions``)."""
    check_diffusers_exportable(student, teacher_folder)
    teacher_root = teacher_folder_of(student, teacher_folder) if student.info.get("conditioning") == "prompts" else None
    net = fold_default_conditions(student, merged_copy(student.net) if has_lora(student.net) else student.net)
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        net.save_pretrained(tmp / "unet")
        meta = {**student.metadata(), "format": FORMAT, "network_class": type(net).__name__, "lora": "null"}
        (tmp / "student.json").write_text(json.dumps(meta, indent=1))
        diffusers_scheduler(student).save_pretrained(tmp / "scheduler")
        if teacher_root is None:
            index = {"_class_name": "ConsistencyModelPipeline", "unet": ["diffusers", type(net).__name__],
                     "scheduler": ["students.diffusers_scheduler", "FewStepScheduler"]}
        else:
            index = _prompt_pipeline_index(student, teacher_root, type(net).__name__)
            for name in PROMPT_COMPONENTS:
                shutil.copytree(teacher_root / name, tmp / name)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only still there when a write or the rename failed
    return folder
