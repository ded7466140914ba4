"""Build a student for a teacher from the run config, and load one from a student file."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from distill.engine.export import CONDITION_PREFIX, read_student_file
from distill.engine.lora import inject_lora
from distill.engine.run_config import LoraSettings, StudentConfig
from students.networks import FROM_CONFIG, NETWORKS, network_from_config
from students.student import Student, student_from_metadata


def _teacher_network(teacher):
    net = getattr(teacher, "unet", None)
    if net is None:
        raise ValueError(f"student.arch 'teacher' copies the teacher's network, but teacher {teacher.name!r} has none "
                         f"(an analytic teacher); use student.arch 'mlp' or 'unet'")
    return copy.deepcopy(net).float().train().requires_grad_(True)


def _both_outputs(cfg: StudentConfig, teacher) -> dict:
    """A ``both`` network outputs x0 and eps: twice the channels (the first dimension of the data shape)."""
    if cfg.prediction_type != "both":
        return {}
    if cfg.arch == "toy_mlp":
        raise ValueError("student.prediction_type 'both' needs student.arch 'mlp' or 'unet' (toy_mlp has one output)")
    return {"out_dim": 2 * teacher.data_shape[0]} if cfg.arch == "mlp" else {"out_channels": 2 * teacher.data_shape[0]}


def build_student(cfg: StudentConfig, teacher, lora: LoraSettings | None = None, init_from: str | Path | None = None) -> Student:
    """A student for ``teacher``: a copy of its network (``arch: teacher``) or a fresh mlp / unet, with the
    weights of the student file ``init_from`` when given (loaded before a LoRA adapter is added)."""
    num_classes = teacher.num_classes if cfg.class_conditional else 0
    info = {"teacher_hash": teacher.hash, "teacher": str(teacher.name), "data_shape": list(teacher.data_shape),
            "num_classes": num_classes, "conditioning": getattr(teacher, "conditioning", "labels"),
            # the first teacher of a chain of student-teachers (progressive rounds, reflow rounds): what the bench checks
            "root_teacher_hash": getattr(teacher, "root_teacher_hash", None) or teacher.hash,
            "root_teacher": str(getattr(teacher, "root_teacher", None) or teacher.name)}
    if cfg.arch == "teacher":
        net, prediction, time_scale = _teacher_network(teacher), teacher.prediction_type, teacher.time_scale
        null_label = getattr(teacher, "null_class_label", None)
    else:
        embeds = num_classes + 1 if num_classes else None  # + a null class for unconditional sampling
        net = NETWORKS[cfg.arch](tuple(teacher.data_shape), embeds, **cfg.model, **_both_outputs(cfg, teacher))
        prediction, time_scale, null_label = cfg.prediction_type, 1.0, (num_classes if num_classes else None)
    student = Student(net, schedule=teacher.schedule, prediction_type=prediction, parameterization=cfg.parameterization,
                      sigma_data=cfg.sigma_data, time_scale=time_scale, null_class_label=null_label,
                      sampling_grid=cfg.sampling_grid, sampler=cfg.sampler, sampler_solver=cfg.sampler_solver,
                      sampling_steps=cfg.sampling_steps, info=info)
    if init_from is not None:
        _load_parent(student, Path(init_from))
    if lora is not None:
        net.requires_grad_(False)
        inject_lora(net, lora.rank, lora.alpha, lora.target_modules)
        student.info["lora"] = {"rank": lora.rank, "alpha": lora.alpha, "target_modules": list(lora.target_modules)}
    return student


def _check_same_function(student: Student, meta: dict, path: Path) -> None:
    """Refuse weights whose output the new student would read otherwise: another parameterization, prediction type
    or (for the consistency forms) sigma_data turns the same network into another function."""
    keys = ["parameterization", "prediction_type"] + (["sigma_data"] if student.parameterization != "denoiser" else [])
    for key in keys:
        theirs, ours = meta.get(key), str(getattr(student, key))
        if theirs is not None and theirs != ours:
            raise ValueError(f"init_from {str(path)!r} was trained with student.{key} {theirs!r} and this run's is {ours!r}: "
                             f"the same weights would compute another function; set student.{key}={theirs}")


def _load_parent(student: Student, path: Path) -> None:
    """Copy the weights (and extra-condition embeddings) of the student file ``path`` into ``student``."""
    state, meta = read_student_file(path)
    if json.loads(meta.get("lora", "null")):
        raise ValueError(f"init_from {str(path)!r} holds an unmerged LoRA adapter; export it merged (scripts/export.py "
                         f"without --keep-lora) and start from that file")
    _check_same_function(student, meta, path)
    extra = {k[len(CONDITION_PREFIX):]: state.pop(k) for k in [k for k in state if k.startswith(CONDITION_PREFIX)]}
    for name, config in json.loads(meta.get("extra_conditions", "{}")).items():
        if name not in student.conditions:
            student.add_condition(name, config["features"], config["scale"], kind=config.get("kind"))
    try:
        student.net.load_state_dict(state, strict=True)
        student.conditions.load_state_dict(extra, strict=False)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"init_from {str(path)!r} does not fit the student network ({meta.get('network_class')} "
                         f"weights into {type(student.net).__name__}: {first})") from None


def load_student(path: str | Path) -> Student:
    """A student from a file written by ``distill.engine.export.save_student`` (LoRA re-injected if not merged). A
    metadata field that does not fit the file (a network config its weights do not fit, a data shape its network does
    not take, a schedule or sampling times that are not valid) is refused in one sentence naming the field."""
    state, meta = read_student_file(path)
    field = lambda key: f"the {key!r} metadata field of student file {str(path)!r}"  # noqa: E731
    try:
        net = network_from_config(meta["network_class"], json.loads(meta["network_config"]))
    except (TypeError, ValueError) as e:  # an unknown network_class says so itself
        known = meta["network_class"] in FROM_CONFIG
        raise ValueError(f"{field('network_config')} does not build a {meta['network_class']} ({e})" if known else str(e)) from None
    lora = json.loads(meta.get("lora", "null"))
    if lora:
        inject_lora(net, lora["rank"], lora["alpha"], lora["target_modules"])
    extra = {k[len(CONDITION_PREFIX):]: state.pop(k) for k in [k for k in state if k.startswith(CONDITION_PREFIX)]}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e).splitlines()[0]).rstrip(".")
        raise ValueError(f"{field('network_config')} does not match the weights the file holds ({first})") from None
    student = student_from_metadata(net.eval(), meta, field)
    _check_data_shape(net, meta, field)
    student.conditions.load_state_dict(extra, strict=True)
    if lora:
        student.info["lora"] = lora
    return student


def _check_data_shape(net, meta: dict, field) -> None:
    """A recorded data shape is a list of positive sizes that the network takes: [dim] for an MLP, [C, H, W] with C its
    input channels for a UNet."""
    if "data_shape" not in meta:
        return
    shape, config = json.loads(meta["data_shape"]), dict(getattr(net, "config", {}))
    expect = ((config["dim"],) if "dim" in config else (config["in_channels"], "H", "W") if "in_channels" in config
              else None)
    sizes = isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    if not sizes or (expect is not None and (len(shape) != len(expect) or shape[0] != expect[0])):
        takes = "" if expect is None else f"; its {type(net).__name__} network takes [{', '.join(map(str, expect))}]"
        raise ValueError(f"{field('data_shape')} is {meta['data_shape']}; allowed: a list of positive sizes{takes}")
