"""No file the project reads runs code (issue #32). Each path gets a crafted file that creates a marker file when it is
unpickled (or imported); the real command-line tool runs on it, and the test asserts that the marker does not exist
and that the tool printed a sentence naming the file."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distill_helpers import RING8, ROOT, TINY, run, same_tensors, subprocess_env, tiny_cfg
from safetensors.torch import load_file

from distill.core.safe_files import UnsafeFileError, load_weights_only, weights_only_torch_load
from distill.engine.checkpoint import MANIFEST, complete_checkpoints, file_list


class _Payload:
    """Unpickled, this calls os.system: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def crafted(path: Path, marker: Path) -> Path:
    """A torch file that creates ``marker`` when unpickled with weights_only=False."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": _Payload(marker), "step": torch.zeros(1)}, path)
    return path


def cli(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), *args], env=env or subprocess_env(),
                          capture_output=True, text=True, timeout=300)


def test_the_crafted_file_runs_code_when_unpickled_without_weights_only(tmp_path):
    """The attack the other tests stop is real: torch.load(weights_only=False) of the crafted file creates the marker."""
    path, marker = crafted(tmp_path / "state.pt", tmp_path / "marker"), tmp_path / "marker"
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafeFileError, match="holds something other than tensors, numbers and strings"):
        load_weights_only(path, "state")
    assert not marker.exists()


# -- prepared samplers' resume states, the bench's FID cache ---------------------------------------------------
PREPARED = {
    "compute_ems": ("ems.safetensors", ["--n-lams", "8", "--num-samples", "128"], "EMS state"),
    "train_amed": ("amed.safetensors", ["--nfe", "2", "--batch-size", "16", "--num-batches", "2"], "AMED state"),
    "gits_search": ("gits.json", ["--steps", "2", "--num-samples", "64", "--fine-steps", "10"], "GITS state"),
}


@pytest.mark.parametrize("script", list(PREPARED))
def test_a_prepared_samplers_state_file_with_code_is_refused(tmp_path, script):
    name, args, what = PREPARED[script]
    out, marker = tmp_path / name, tmp_path / "marker"
    state = crafted(tmp_path / f"{name}.state.pt", marker)
    done = cli(script, "--teacher", "gmm:aniso2d", *args, "--out", str(out))
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"error: {what} {str(state)!r} holds something other than tensors, numbers and strings" in done.stderr
    assert "Traceback" not in done.stderr and not marker.exists() and not out.exists()


def test_a_fid_cache_file_with_code_is_refused(tmp_path):
    from conftest import save_teacher_folder, tiny_unet
    from diffusers import DDPMScheduler

    from distill.data import load_dataset
    from distill.eval.fid import EXTRACTOR, reference_cache_name

    teacher = save_teacher_folder(tmp_path / "teacher", tiny_unet(num_class_embeds=10, sample_size=16), DDPMScheduler())
    cache, marker = tmp_path / "cache", tmp_path / "marker"
    path = crafted(cache / f"{reference_cache_name(load_dataset('mnist16', 'reference').x, EXTRACTOR)}.pt", marker)
    done = cli("bench", "--teacher", str(teacher), "--solvers", "euler", "--nfe", "2", "--num-samples", "8",
               "--fid-cache", str(cache), "--out", str(tmp_path / "out"))
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"error: FID feature cache {str(path)!r} holds something other than tensors" in done.stderr
    assert "Traceback" not in done.stderr and not marker.exists() and not (tmp_path / "out").exists()


# -- resume ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A tiny consistency run stopped at its step-4 checkpoint (of 8 steps): an EMA and an EMA target to restore."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    assert run(tiny_cfg(out, "max_steps=8"), stop_at=4) is None
    return out


def _copy(stopped_run, tmp_path) -> tuple[Path, Path]:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    return out, complete_checkpoints(out / "checkpoints")[-1]


def _commit(ckpt: Path, drop_format: bool = False) -> None:
    """Record every file's size and sha256 in the manifest again, as an attacker who replaced a file would."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    if drop_format:
        manifest.pop("state_format")
    (ckpt / MANIFEST).write_text(json.dumps({**manifest, "files": file_list(ckpt)}))


def as_before_0_3(ckpt: Path, marker: Path) -> None:
    """Rewrite a checkpoint as accelerate's save_state wrote it before 0.3: pickled optimizer and custom objects (EMA,
    then the EMA target), random states in a pickle (a crafted one: it must never be read)."""
    tensors, info = load_file(str(ckpt / "optimizer.safetensors")), json.loads((ckpt / "optimizer.json").read_text())
    state = {int(i): {k: tensors[f"{i}.{k}"] for k in keys} for i, keys in info["keys"].items()}
    torch.save({"state": state, "param_groups": info["param_groups"]}, ckpt / "optimizer.bin")
    for i, name in enumerate(("ema", "helper.target")):
        torch.save(load_file(str(ckpt / f"{name}.safetensors")), ckpt / f"custom_checkpoint_{i}.pkl")
    crafted(ckpt / "random_states_0.pkl", marker)
    for path in [*ckpt.glob("optimizer.*"), *ckpt.glob("ema.*"), *ckpt.glob("helper.*"), *ckpt.glob("rng_state_*")]:
        if path.suffix != ".bin":
            path.unlink()
    _commit(ckpt, drop_format=True)


def resume(out: Path) -> subprocess.CompletedProcess:
    return cli("distill", "--config", str(RING8), "--output-dir", str(out), "--set", *TINY, "max_steps=8", "--resume", "latest")


def test_a_checkpoint_of_before_0_3_resumes_without_unpickling_code(stopped_run, tmp_path):
    out, ckpt = _copy(stopped_run, tmp_path)
    marker = tmp_path / "marker"
    as_before_0_3(ckpt, marker)
    done = resume(out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {ckpt} at step 4" in done.stdout and "was written before version 0.3" in done.stdout
    assert not marker.exists()
    run(tiny_cfg(tmp_path / "full", "max_steps=8"))  # this objective draws no global random numbers: bit-identical
    for name in ("student.safetensors", "student_ema.safetensors"):
        assert same_tensors(tmp_path / "full" / name, out / name), name


RESUME_CASES = {  # the file replaced by the crafted one, whether the checkpoint is in the format of before 0.3, the sentence
    "pickled EMA of before 0.3": ("custom_checkpoint_0.pkl", True, "holds something other than tensors"),
    "pickled optimizer of before 0.3": ("optimizer.bin", True, "holds something other than tensors"),
    "a pickle named optimizer.safetensors": ("optimizer.safetensors", False, "is not a safetensors file"),
    "a pickle named ema.safetensors": ("ema.safetensors", False, "is not a safetensors file"),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_refuses_a_checkpoint_file_with_code(stopped_run, tmp_path, case):
    name, old_format, sentence = RESUME_CASES[case]
    out, ckpt = _copy(stopped_run, tmp_path)
    marker = tmp_path / "marker"
    if old_format:
        as_before_0_3(ckpt, tmp_path / "never")
    crafted(ckpt / name, marker)
    _commit(ckpt)
    done = resume(out)
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"error: checkpoint file {str(ckpt / name)!r} {sentence}" in done.stderr
    assert "Traceback" not in done.stderr and not marker.exists() and not (tmp_path / "never").exists()
    assert not (out / "student.safetensors").exists()


def test_deepspeed_loads_go_through_the_weights_only_unpickler(tmp_path):
    """DeepSpeed unpickles its own checkpoint files with weights_only=False; the trainer resumes it inside
    ``weights_only_torch_load``, which forces the weights-only unpickler with DeepSpeed's plain records allowed."""
    marker, original = tmp_path / "marker", torch.load
    path = crafted(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with weights_only_torch_load(what="DeepSpeed checkpoint file"):
        with pytest.raises(UnsafeFileError, match="DeepSpeed checkpoint file .* holds something other than tensors"):
            torch.load(path, map_location="cpu", weights_only=False)  # as DeepSpeed calls it
    assert not marker.exists() and torch.load is original  # the patch is gone again
    pytest.importorskip("deepspeed")
    from distill.engine.run_state import _deepspeed_records

    LossScaler, _, ZeroStageEnum, fragment_address = _deepspeed_records()
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(2), "map": [fragment_address(4, 0)]},
               tmp_path / "records.pt")
    with weights_only_torch_load(_deepspeed_records()):
        state = torch.load(tmp_path / "records.pt", weights_only=False)
    assert state["zero_stage"] == 2 and state["loss_scaler"].cur_scale == 1.0 and state["map"][0].numel == 4



@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="the deepspeed extra is not installed")
def test_a_deepspeed_run_resumes_bit_identically_and_refuses_a_deepspeed_file_with_code(tmp_path):
    import shutil

    import yaml

    config = yaml.safe_load((ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml").read_text())
    (tmp_path / "accelerate.yaml").write_text(yaml.safe_dump({**config, "num_processes": 1, "mixed_precision": "no"}))

    def launch(out: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "accelerate.yaml"),
               "--main_process_port", "29583", str(ROOT / "scripts" / "distill.py"), "--config", str(RING8), "--output-dir",
               str(out), "--set", *TINY, f"max_steps={steps}", "checkpoint_every=2", *extra]
        return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)

    for out, steps in ((tmp_path / "full", 6), (tmp_path / "part", 4)):
        done = launch(out, steps)
        assert done.returncode == 0, done.stderr[-3000:]
    crafted_run, marker = tmp_path / "crafted", tmp_path / "marker"
    shutil.copytree(tmp_path / "part", crafted_run)
    ckpt = crafted_run / "checkpoints" / "step-4"
    optim = next((ckpt / "pytorch_model").glob("*optim_states.pt"))
    crafted(optim, marker)
    _commit(ckpt)
    done = launch(crafted_run, 6, "--resume", "latest")
    assert done.returncode != 0 and not marker.exists()
    assert f"error: DeepSpeed checkpoint file {str(optim)!r} holds something other than tensors" in done.stderr
    done = launch(tmp_path / "part", 6, "--resume", "latest")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {tmp_path / 'part' / 'checkpoints' / 'step-4'} at step 4" in done.stdout
    for name in ("student.safetensors", "student_ema.safetensors"):
        assert same_tensors(tmp_path / "full" / name, tmp_path / "part" / name), name


# -- a text-to-image pipeline's model_index.json ---------------------------------------------------------------------
def _pipeline_folder(root: Path, text_encoder: list) -> Path:
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": text_encoder, "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDIMScheduler"]}
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (root / name).mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.mark.parametrize("entry", [["marker_module", "CLIPTextModel"], ["os", "system"], ["diffusers", "DiffusionPipeline"]])
def test_a_model_index_naming_another_module_is_refused_before_any_import(tmp_path, entry):
    folder, marker = _pipeline_folder(tmp_path / "pipe", entry), tmp_path / "marker"
    (folder / "marker_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nCLIPTextModel = None\n")
    env = {**subprocess_env(), "PYTHONPATH": str(folder) + os.pathsep + subprocess_env()["PYTHONPATH"]}
    if entry[0] == "marker_module":  # the module is importable where the tool runs: importing it creates the marker
        subprocess.run([sys.executable, "-c", "import marker_module"], env=env, check=True)
        assert marker.exists()
        marker.unlink()
    done = cli("sample", "--teacher", str(folder), "--solver", "euler", "--nfe", "2", "--n", "2",
               "--out", str(tmp_path / "out"), env=env)
    assert done.returncode == 1, done.stderr[-2000:]
    assert (f"error: model_index.json of {str(folder)!r} names {entry[0]}.{entry[1]} for text_encoder, which a "
            f"text-to-image teacher cannot use; allowed: transformers.CLIPTextModel or transformers.T5EncoderModel") in done.stderr
    assert "Traceback" not in done.stderr and not marker.exists() and not (tmp_path / "out").exists()
