"""The trainer's resumable state as tensors (safetensors) and JSON, so that resuming a run unpickles nothing.

Besides the student files, a checkpoint folder (made atomic by ``distill.engine.checkpoint``) holds:

    model.safetensors, model_1.safetensors, ...      each trained network, in the objective's order (unwrapped keys)
    optimizer.safetensors + optimizer.json, ...      each optimizer: its state tensors ("<param>.<key>"); the param
                                                     groups and any other value in the JSON
    ema.safetensors, helper.<name>.safetensors       the student EMA and each of the objective's helpers
    scaler.json                                      the fp16 loss scaler, when there is one
    rng_state_<rank>.safetensors + .json             every rank's torch (CPU, CUDA), NumPy and Python random states

Under DeepSpeed the trained network and its optimizer are DeepSpeed's own files (``pytorch_model/``, sharded by
rank), which DeepSpeed unpickles: they are read through torch's weights-only unpickler with DeepSpeed's four plain
record classes allowed (``distill.core.safe_files.weights_only_torch_load``), and a file holding anything else is
refused with a sentence.

The manifest records ``state_format``. A checkpoint without it was written before version 0.3 by accelerate's
``save_state`` (optimizer.bin, custom_checkpoint_<i>.pkl, random_states_<rank>.pkl: pickles): it still resumes, its
pickles read with the weights-only unpickler (refused with a sentence when they hold anything else), except its random
states, which are not read (a note says so).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from distill.core.safe_files import UnsafeFileError, load_weights_only, weights_only_torch_load
from distill.engine.checkpoint import read_manifest
from distill.objectives.base import unwrap

STATE_FORMAT = 1  # the manifest's "state_format"; absent: accelerate's pickles, before version 0.3
DEEPSPEED_TAG = "pytorch_model"  # the folder of DeepSpeed's files in a checkpoint (accelerate's name for it)


def _numbered(name: str, i: int) -> str:
    return name if i == 0 else f"{name}_{i}"


def _is_deepspeed(acc) -> bool:
    return getattr(acc.state, "deepspeed_plugin", None) is not None


def _check_supported(acc) -> None:
    kind = str(getattr(acc, "distributed_type", "NO")).split(".")[-1]
    if kind in ("FSDP", "MEGATRON_LM", "XLA"):
        raise ValueError(f"the trainer checkpoints single-process, DDP and DeepSpeed runs; this launch uses {kind}")


# -- tensors and JSON ------------------------------------------------------------------------------------
def cpu_tensors(state: dict, what: str) -> dict[str, torch.Tensor]:
    """A state dict's tensors on the CPU, contiguous, each with its own storage (safetensors refuses shared ones)."""
    out, seen = {}, set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{what} holds {key!r}, a {type(value).__name__}: checkpoints keep tensors (and JSON) only")
        value = value.detach().cpu()
        if value.untyped_storage().data_ptr() in seen or not value.is_contiguous():
            value = value.clone(memory_format=torch.contiguous_format)
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value
    return out


def write_tensors(folder: Path, name: str, tensors: dict, info=None) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(folder / f"{name}.safetensors"), metadata={"format": "pt"})
    if info is not None:
        (folder / f"{name}.json").write_text(json.dumps(info))


def _require(path: Path) -> Path:
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path.parent)!r} lacks {path.name}, so it cannot be resumed")
    return path


def read_json(path: Path):
    try:
        return json.loads(_require(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnsafeFileError(f"checkpoint file {str(path)!r} is not valid JSON ({e}); it was not loaded") from None


def read_tensors(folder: Path, name: str, with_info: bool = False):
    """``name``.safetensors (with ``name``.json) of a checkpoint; a missing or unreadable file is one sentence."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _require(folder / f"{name}.safetensors")
    try:
        tensors = load_file(str(path))
    except SafetensorError as e:
        raise UnsafeFileError(f"checkpoint file {str(path)!r} is not a safetensors file ({e}); it was not loaded") from None
    return (tensors, read_json(folder / f"{name}.json")) if with_info else tensors


# -- optimizers, random states ---------------------------------------------------------------------------
def optimizer_files(opt) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state dict as tensors ("<param index>.<key>") and JSON (param groups, other values, key order)."""
    state = opt.state_dict()
    tensors, values = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                values.setdefault(str(index), {})[key] = value
    keys = {str(index): list(entry) for index, entry in state["state"].items()}
    return cpu_tensors(tensors, "the optimizer state"), {"param_groups": state["param_groups"], "keys": keys, "values": values}


def optimizer_state(tensors: dict, info: dict, opt) -> dict:
    """The state dict ``optimizer_files`` wrote, tuples (betas) restored where ``opt``'s own groups hold tuples."""
    state = {int(i): {k: tensors[f"{i}.{k}"] if f"{i}.{k}" in tensors else info["values"][i][k] for k in keys}
             for i, keys in info["keys"].items()}
    groups = [{k: tuple(v) if isinstance(mine.get(k), tuple) and isinstance(v, list) else v for k, v in group.items()}
              for group, mine in zip(info["param_groups"], opt.state_dict()["param_groups"])]
    return {"state": state, "param_groups": groups + info["param_groups"][len(groups):]}


def rng_files() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's torch (CPU and every CUDA device), NumPy and Python random states."""
    import numpy as np

    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "python": torch.tensor(mt, dtype=torch.int64),
               "numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors, {"python": [version, gauss], "numpy": [name, int(pos), int(has_gauss), float(cached)]}


def set_rng(tensors: dict, info: dict) -> None:
    import numpy as np

    random.setstate((info["python"][0], tuple(int(v) for v in tensors["python"].tolist()), info["python"][1]))
    name, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])


# -- the run ------------------------------------------------------------------------------------------------
def extras(run) -> dict:
    """The student EMA and the objective's helpers, in the order accelerate numbered them (custom_checkpoint_<i>)."""
    out = {"ema": run.ema} if run.ema is not None else {}
    return {**out, **{f"helper.{name}": module for name, module in sorted(run.objective.helpers().items())}}


def write_state(run, folder: Path) -> None:
    """On every rank: its random states (and its DeepSpeed shard); on the main rank the rest (module doc)."""
    acc, folder = run.accelerator, Path(folder)
    _check_supported(acc)
    if _is_deepspeed(acc):
        run.nets["student"].save_checkpoint(str(folder), DEEPSPEED_TAG)
    elif acc.is_main_process:
        for i, name in enumerate(run.nets):
            write_tensors(folder, _numbered("model", i), cpu_tensors(unwrap(run.nets[name]).state_dict(), f"network {name!r}"))
            write_tensors(folder, _numbered("optimizer", i), *optimizer_files(run.opts[name]))
        if acc.scaler is not None:
            (folder / "scaler.json").write_text(json.dumps(acc.scaler.state_dict()))
    if acc.is_main_process:
        for key, module in extras(run).items():
            write_tensors(folder, key, cpu_tensors(module.state_dict(), key))
    write_tensors(folder, f"rng_state_{acc.process_index}", *rng_files())


def _deepspeed_records() -> tuple:
    """The plain classes DeepSpeed pickles into its optimizer files (a loss scaler, an enum, a named tuple)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address


def _legacy(folder: Path, name: str):
    """A pickle of a checkpoint written before 0.3, through the weights-only unpickler."""
    return load_weights_only(_require(folder / name), "checkpoint file")


def _read_networks(run, ckpt: Path, legacy: bool) -> None:
    acc = run.accelerator
    if _is_deepspeed(acc):
        with weights_only_torch_load(_deepspeed_records(), "DeepSpeed checkpoint file"):
            found, _ = run.nets["student"].load_checkpoint(str(ckpt), DEEPSPEED_TAG)
        if found is None:
            raise ValueError(f"checkpoint {str(ckpt)!r} holds no DeepSpeed state ({DEEPSPEED_TAG}/): it was not written "
                             f"by a DeepSpeed run; resume it with the launch that wrote it")
        return
    for i, name in enumerate(run.nets):
        weights = read_tensors(ckpt, _numbered("model", i))
        if legacy and all(k.startswith("module.") for k in weights):  # accelerate kept DDP's prefix
            weights = {k[len("module."):]: v for k, v in weights.items()}
        unwrap(run.nets[name]).load_state_dict(weights, strict=True)
        opt = run.opts[name]
        state = _legacy(ckpt, _numbered("optimizer", i) + ".bin") if legacy else optimizer_state(
            *read_tensors(ckpt, _numbered("optimizer", i), with_info=True), opt)
        opt.load_state_dict(state)
    if acc.scaler is not None:
        scaler = _legacy(ckpt, "scaler.pt") if legacy else read_json(ckpt / "scaler.json")
        acc.scaler.load_state_dict(scaler)


def read_state(run, ckpt: Path, log=print) -> None:
    """Restore what ``write_state`` wrote (or accelerate's ``save_state`` before 0.3) into ``run``, unpickling nothing
    but through the weights-only unpickler."""
    acc, ckpt = run.accelerator, Path(ckpt)
    _check_supported(acc)
    version = read_manifest(ckpt).get("state_format")
    if version not in (None, STATE_FORMAT):
        raise ValueError(f"checkpoint {str(ckpt)!r} has state format {version!r}; this version reads format {STATE_FORMAT} "
                         f"(and the pickles of before 0.3): resume it with the version that wrote it")
    legacy = version is None
    _read_networks(run, ckpt, legacy)
    objects = extras(run)
    pickles = sorted(ckpt.glob("custom_checkpoint_*.pkl"))
    if legacy and len(pickles) != len(objects):
        raise ValueError(f"checkpoint {str(ckpt)!r} holds {len(pickles)} custom_checkpoint_<i>.pkl files, but this run "
                         f"keeps {len(objects)} objects ({', '.join(objects) or 'none'}); resume it with its own config")
    for i, (key, module) in enumerate(objects.items()):
        state = _legacy(ckpt, f"custom_checkpoint_{i}.pkl") if legacy else read_tensors(ckpt, key)
        module.load_state_dict(state, strict=True)
    if legacy:
        log(f"note: {ckpt} was written before version 0.3 (pickled state, read as plain tensors); its random states "
            f"(random_states_<rank>.pkl) are not read, so the continuation may differ from an uninterrupted run")
    elif (ckpt / f"rng_state_{acc.process_index}.safetensors").is_file():  # a rank the run did not have: left as is
        set_rng(*read_tensors(ckpt, f"rng_state_{acc.process_index}", with_info=True))
