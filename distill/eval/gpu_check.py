"""A one-command hardware check (``scripts/gpu_check.py``): training speed and peak memory of consistency distillation
and SiD, a DeepSpeed ZeRO-2 run, and sampling throughput of our solvers against diffusers' schedulers, all on one
random-init ``UNet2DModel`` teacher (nothing is downloaded).

Sizes: ``cifar`` is the DDPM CIFAR-10 network (Ho et al. 2020: 32x32x3, channels 128-256-256-256, attention at
16x16, 35.7 M parameters) for a GPU; ``tiny`` (8x8x3, channels 16-32) runs the same code on a CPU in seconds.

Each training run is its own process (the engine's ``train`` through ``scripts/gpu_check.py --worker SPEC``, under
``accelerate launch`` for DeepSpeed), so that its peak memory is its own: ``torch.cuda.max_memory_allocated`` on a
GPU, the peak resident set size (``getrusage``) on a CPU. Speed is the mean of the steps after the first two (warm-up),
from the ``seconds_per_step`` the trainer logs in ``metrics.jsonl`` at ``log_every=1`` (checkpoint writing is outside
it). Consistency distillation reads its x0 from a folder of random PNGs (an ``hf:`` imagefolder: each batch is
decoded from PNG, as real data would be); SiD needs no data.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path

import torch

from distill.engine.run_files import METRICS_FILE
from distill.eval.solver_overhead import PAIRS

SIZES = {
    "cifar": {"sample_size": 32, "block_out_channels": (128, 256, 256, 256), "layers_per_block": 2,
              "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
              "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")},
    "tiny": {"sample_size": 8, "block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
             "down_block_types": ("DownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "UpBlock2D")},
}
# per size: training batch, sampling batch, timed sampling repeats, default training steps, seconds allowed per run
BUDGETS = {"cifar": {"batch_size": 128, "sample_batch": 256, "repeats": 5, "steps": 40, "timeout_seconds": 120},
           "tiny": {"batch_size": 8, "sample_batch": 16, "repeats": 2, "steps": 10, "timeout_seconds": 300}}
WARMUP_STEPS = 2  # steps left out of the timing (allocator, cuDNN autotuning, lazy init)
NFE = 10
SOLVERS = ("dpmpp_2m", "unipc")
CPU_PRECISION_NOTE = ("no: float32 on a CPU (bf16 autocast was 3.5-5x slower than float32 for the tiny UNet on our "
                      "2-core CPU machines: it is emulated there)")
RUNS = {  # name: (run config overrides, launched under DeepSpeed ZeRO-2)
    "consistency": ({"objective": {"name": "consistency"}, "optim": {"lr": 2e-4},
                     "student": {"arch": "teacher", "parameterization": "consistency_edm"}}, False),
    "sid": ({"objective": {"name": "sid"}, "optim": {"lr": 1e-5, "betas": [0.0, 0.999]},
             "student": {"arch": "teacher", "parameterization": "denoiser", "sampling_steps": [1]}}, False),
    "deepspeed_zero2": ({"objective": {"name": "consistency"}, "optim": {"lr": 2e-4},
                         "student": {"arch": "teacher", "parameterization": "consistency_edm"}}, True),
}


# -- the machine ---------------------------------------------------------------------------------------------
def device_info(tiny: bool) -> dict:
    """Device kind and name, the slug that names the result files, the model size and the mixed precision."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ("-tiny" if tiny else "")
        return {"kind": "cuda", "name": name, "slug": slug, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
                "size": "tiny" if tiny else "cifar", "mixed_precision": "bf16", "precision_note": "bf16 autocast"}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"kind": "cpu", "name": f"cpu ({platform.machine()}, {cores} cores available)", "slug": "cpu", "size": "tiny",
            "threads": torch.get_num_threads(), "mixed_precision": "no", "precision_note": CPU_PRECISION_NOTE}


def versions() -> dict:
    import accelerate
    import diffusers

    out = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "accelerate": accelerate.__version__, "deepspeed": None}
    if find_spec("deepspeed") is not None:
        out["deepspeed"] = version("deepspeed")
    return out


def deepspeed_skip_reason(device: dict) -> str | None:
    """Why the DeepSpeed run cannot be made here, or None."""
    if find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install --no-build-isolation -e '.[deepspeed]')"
    if device["kind"] != "cuda":
        return ("no CUDA GPU (DeepSpeed training needs one; its CPU accelerator is covered by "
                "tests/test_ecosystem.py)")
    return None


# -- the teacher and the data --------------------------------------------------------------------------------
def write_teacher_folder(root: Path, size: str, seed: int = 0) -> int:
    """A random-init UNet2DModel + a linear-beta DDPMScheduler as a DDPMPipeline folder; returns the parameter count."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(in_channels=3, out_channels=3, **SIZES[size])
    unet.save_pretrained(root / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon").save_pretrained(root / "scheduler")
    index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return sum(p.numel() for p in unet.parameters())


def write_image_folder(root: Path, resolution: int, count: int, seed: int = 0) -> None:
    """``count`` random RGB PNGs (an unlabelled imagefolder)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        pixels = torch.randint(0, 256, (resolution, resolution, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(root / f"{i:04d}.png")


# -- training runs -------------------------------------------------------------------------------------------
def run_config(name: str, teacher: Path, data: Path, out: Path, batch_size: int, steps: int, precision: str) -> dict:
    overrides, _ = RUNS[name]
    needs_data = overrides["objective"]["name"] == "consistency"
    return {**overrides, "teacher": str(teacher), "dataset": f"hf:{data}" if needs_data else None,
            "batch_size": batch_size, "max_steps": steps, "checkpoint_every": steps, "keep_checkpoints": 1,
            "log_every": 1, "mixed_precision": precision, "output_dir": str(out), "seed": 0}


def peak_memory() -> dict:
    """This process's peak memory: allocated CUDA memory on a GPU, resident set size on a CPU."""
    if torch.cuda.is_available():
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(), "peak_memory_source": "torch.cuda.max_memory_allocated"}
    import resource

    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
            "peak_memory_source": "peak RSS of the run's process (getrusage ru_maxrss)"}


def worker(spec_path: str | Path, load_teacher, build_student) -> None:
    """One training run in this process (``scripts/gpu_check.py --worker SPEC``); writes its peak memory to the spec's
    ``result`` file."""
    from distill.engine.run_config import load_run_config
    from distill.engine.train import train

    spec = json.loads(Path(spec_path).read_text())
    cfg = load_run_config(None, spec["config"])
    t0 = time.perf_counter()
    train(cfg, load_teacher=load_teacher, build_student=build_student, log=lambda m: None)
    result = {"train_seconds": time.perf_counter() - t0, **peak_memory()}
    if int(os.environ.get("RANK", "0")) == 0:
        Path(spec["result"]).write_text(json.dumps(result))


def step_seconds(run_dir: Path) -> list[float]:
    """Seconds of each step, in order, from a run's metrics.jsonl (every network's row of a step has the same value)."""
    seconds = {}
    for line in (run_dir / METRICS_FILE).read_text().splitlines():
        row = json.loads(line)
        seconds.setdefault(row["step"], row["seconds_per_step"])
    return [seconds[s] for s in sorted(seconds)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(script: Path, spec: Path, deepspeed: bool) -> list[str]:
    if not deepspeed:
        return [sys.executable, str(script), "--worker", str(spec)]
    config = script.resolve().parents[1] / "configs" / "accelerate" / "deepspeed_zero2.yaml"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "1",
            "--main_process_port", str(free_port()), str(script), "--worker", str(spec)]


def run_process(command: list[str], env: dict, timeout: float) -> tuple[int | None, str]:
    """(exit status or None on timeout, stdout + stderr); the process group started here is killed on timeout, so
    that a launcher's child (accelerate launch -> the training process) does not keep the GPU."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return None, output
    return proc.returncode, output


def train_run(name: str, script: Path, work: Path, teacher: Path, data: Path, device: dict, steps: int, log) -> dict:
    """Launch one training run and return its numbers (or ``failed: <last lines>``)."""
    budget = BUDGETS[device["size"]]
    run_dir, spec = work / name, work / f"{name}.json"
    config = run_config(name, teacher, data, run_dir, budget["batch_size"], steps, device["mixed_precision"])
    spec.write_text(json.dumps({"config": config, "result": str(work / f"{name}.result.json")}))
    command = launch_command(script, spec, RUNS[name][1])
    env = {**os.environ, "PYTHONPATH": str(script.resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(work / "hf_datasets_cache")}
    log(f"{name}: {budget['batch_size']} images x {steps} steps, "
        + ("accelerate launch, DeepSpeed ZeRO-2, 1 process" if RUNS[name][1] else "one process"))
    t0 = time.perf_counter()
    returncode, output = run_process(command, env, budget["timeout_seconds"])
    if returncode != 0:
        tail = output.strip().splitlines()
        why = f"timed out after {budget['timeout_seconds']} s" if returncode is None else " | ".join(tail[-3:])
        return {"failed": why, "output_tail": tail[-40:]}
    seconds = step_seconds(run_dir)[min(WARMUP_STEPS, steps - 1):]
    per_step = sum(seconds) / len(seconds)
    result = json.loads((work / f"{name}.result.json").read_text())
    return {"objective": config["objective"]["name"], "parameterization": config["student"]["parameterization"],
            "batch_size": budget["batch_size"], "steps": steps, "timed_steps": len(seconds),
            "steps_per_second": 1 / per_step, "images_per_second": budget["batch_size"] / per_step,
            "mixed_precision": device["mixed_precision"], **result, "wall_seconds": time.perf_counter() - t0}


# -- sampling throughput -------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def diffusers_loop(unet, scheduler, noise: torch.Tensor, nfe: int) -> torch.Tensor:
    """diffusers' sampling loop (as DDPMPipeline's, without its conversion to images)."""
    scheduler.set_timesteps(nfe, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
    return x


def images_per_second(fn, batch: int, repeats: int, device: torch.device) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    synchronize(device)
    return batch * repeats / (time.perf_counter() - t0), out


def compare_solver(teacher, solver: str, our_args, sched_name: str, overrides: dict, noise: torch.Tensor, repeats: int) -> dict:
    """Images per second of our ``solver`` and of the diffusers scheduler at the same timesteps, and how far apart
    their samples are."""
    import diffusers

    from distill.solvers import sample

    batch, device = noise.shape[0], noise.device
    scheduler = getattr(diffusers, sched_name)(num_train_timesteps=1000, beta_schedule="linear", **overrides)
    theirs, x_theirs = images_per_second(lambda: diffusers_loop(teacher.unet, scheduler, noise, NFE), batch, repeats, device)
    scheduler.set_timesteps(NFE)
    args = our_args(scheduler)
    ours, x_ours = images_per_second(lambda: sample(teacher, noise, solver=solver, **args), batch, repeats, device)
    return {"diffusers_scheduler": sched_name, "nfe": NFE, "batch_size": batch, "repeats": repeats,
            "ours_images_per_second": ours, "diffusers_images_per_second": theirs, "ratio_ours_over_diffusers": ours / theirs,
            "max_abs_difference": float((x_ours.float() - x_theirs.float()).abs().max())}


def sampling_throughput(teacher, device: torch.device, batch: int, repeats: int, log) -> dict:
    """``compare_solver`` for each of ``SOLVERS`` at ``NFE`` on the same UNet and noise, in float32 (the schedulers'
    configs are solver_overhead's ``PAIRS``); a solver that fails is recorded as ``failed`` and the others still run."""
    noise = torch.randn((batch, *teacher.data_shape), generator=torch.Generator().manual_seed(0)).to(device)
    out = {}
    with torch.inference_mode():
        for solver, our_args, sched_name, overrides, _ in PAIRS:
            if solver not in SOLVERS:
                continue
            try:
                out[solver] = row = compare_solver(teacher, solver, our_args, sched_name, overrides, noise, repeats)
            except Exception as e:  # noqa: BLE001  one GPU try: record it, keep the other numbers
                out[solver] = {"diffusers_scheduler": sched_name, "failed": f"{type(e).__name__}: {e}"}
                log(f"{solver}: failed: {out[solver]['failed']}")
                continue
            log(f"{solver}: ours {row['ours_images_per_second']:.1f} img/s, diffusers {sched_name} "
                f"{row['diffusers_images_per_second']:.1f} img/s")
    return out


# -- the whole check -----------------------------------------------------------------------------------------
def gpu_check(work: Path, script: Path, command: str, tiny: bool, steps: int | None, load_teacher, log=print) -> dict:
    """Every measurement of the module doc in ``work`` (a scratch folder); the results as one JSON-able dict."""
    t0 = time.perf_counter()
    device = device_info(tiny)
    budget = BUDGETS[device["size"]]
    steps = steps or budget["steps"]
    teacher_dir, data_dir = work / "teacher", work / "images"
    params = write_teacher_folder(teacher_dir, device["size"])
    write_image_folder(data_dir, SIZES[device["size"]]["sample_size"], 2 * budget["batch_size"])
    log(f"{device['name']}: {device['size']} UNet2DModel, {params / 1e6:.2f} M parameters, mixed precision "
        f"{device['mixed_precision']}")
    training = {}
    for name in RUNS:
        skip = deepspeed_skip_reason(device) if RUNS[name][1] else None
        training[name] = {"skipped": skip} if skip else train_run(name, script, work, teacher_dir, data_dir, device, steps, log)
        if skip:
            log(f"{name}: skipped: {skip}")
    teacher = load_teacher(teacher_dir).to(torch.device(device["kind"]))
    sampling = sampling_throughput(teacher, torch.device(device["kind"]), budget["sample_batch"], budget["repeats"], log)
    return {"command": command, "versions": versions(), "device": device,
            "model": {"class": "UNet2DModel", "size": device["size"], "parameters": params, "in_channels": 3,
                      **{k: list(v) if isinstance(v, tuple) else v for k, v in SIZES[device["size"]].items()},
                      "scheduler": "DDPMScheduler (linear betas, epsilon prediction), random init"},
            "training": training, "sampling": {"dtype": "float32", "solvers": sampling},
            "warmup_steps_excluded": WARMUP_STEPS, "total_seconds": time.perf_counter() - t0}


def _num(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def markdown(r: dict) -> str:
    """A short report: the command, versions, device, and the two tables."""
    v, d = r["versions"], r["device"]
    lines = [f"# GPU check: {d['name']}", "", f"`{r['command']}`", "",
             f"torch {v['torch']}, diffusers {v['diffusers']}, accelerate {v['accelerate']}, deepspeed {v['deepspeed']}; "
             f"{r['model']['size']} UNet2DModel ({r['model']['parameters'] / 1e6:.2f} M parameters); mixed precision "
             f"{d['precision_note']}; {r['total_seconds']:.0f} s in all.", "",
             "| training run | batch | steps/s | images/s | peak memory (MiB) |", "|---|---|---|---|---|"]
    for name, row in r["training"].items():
        if "steps_per_second" not in row:
            why = f"skipped: {row['skipped']}" if "skipped" in row else f"failed: {row.get('failed', '')}"
            lines.append(f"| {name} | {why} | | | |")
            continue
        lines.append(f"| {name} | {row['batch_size']} | {_num(row['steps_per_second'], '.2f')} | "
                     f"{_num(row['images_per_second'], '.1f')} | {_num(row['peak_memory_bytes'] / 2**20, '.0f')} |")
    lines += ["", f"Sampling, {NFE} NFE, float32, images per second:", "",
              "| solver | ours | diffusers scheduler | diffusers | ours / diffusers | max abs difference |",
              "|---|---|---|---|---|---|"]
    for solver, row in r["sampling"]["solvers"].items():
        if "failed" in row:
            lines.append(f"| {solver} | failed: {row['failed']} | {row['diffusers_scheduler']} | | | |")
            continue
        lines.append(f"| {solver} | {_num(row['ours_images_per_second'], '.1f')} | {row['diffusers_scheduler']} | "
                     f"{_num(row['diffusers_images_per_second'], '.1f')} | {_num(row['ratio_ours_over_diffusers'], '.2f')} | "
                     f"{_num(row['max_abs_difference'], '.2e')} |")
    return "\n".join(lines) + "\n"
