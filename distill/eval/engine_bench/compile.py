"""Step time of the trainer eager, with ``compile: true`` and under bf16 autocast, and what each does to the losses.

    python scripts/engine_compile.py [--configs configs/distill/cd_mnist16.yaml configs/distill/sid_mnist16.yaml]
        [--modes eager compile bf16] [--batch-size 32] [--steps 20] [--warmup 5] [--threads 1] [--out results/engine]

Each (config, mode) trains ``warmup + steps`` steps in a fresh subprocess with its own empty inductor cache (so the
compile time is a cold one), one metrics row per step. Step time: median (and mean) of the ``steps`` steps after the
warm-up (``seconds_per_step``, checkpoint writing excluded). Compile time: dynamo's and inductor's own timers over the
whole run (a recompile for a new batch shape after the warm-up included). Loss
difference: the largest absolute and relative difference of the per-step losses of every network from eager's, over
all ``warmup + steps`` steps. Writes ``<out>/compile.json`` and ``<out>/compile.md`` (command, hardware, torch version,
date). Run it on an otherwise idle machine: step times of a shared one mean little.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distill.eval.engine_bench import ROOT  # noqa: E402

CONFIGS = ["configs/distill/cd_mnist16.yaml", "configs/distill/sid_mnist16.yaml"]
MODES = {"eager": [], "compile": ["compile=true"], "bf16": ["mixed_precision=bf16"],
         "compile_bf16": ["compile=true", "mixed_precision=bf16"]}


SCRIPT = ROOT / "scripts" / "engine_compile.py"  # the front end, run again for each child process


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=CONFIGS)
    p.add_argument("--modes", nargs="+", default=["eager", "compile", "bf16"], choices=list(MODES))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="measured steps after the warm-up")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the step time (compilation)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op and inter-op threads")
    p.add_argument("--out", default="results/engine")
    p.add_argument("--worker", nargs=3, metavar=("CONFIG", "MODE", "RUN_DIR"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args) -> None:
    """One training run in this process (called by ``run_one`` in a subprocess)."""
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)
    from distill.engine.config import parse_overrides
    from distill.engine.run_config import load_run_config
    from distill.engine.train import train
    from distill.eval.engine_bench import build_student, load_teacher

    config, mode, run_dir = args.worker
    steps = args.warmup + args.steps
    overrides = [f"batch_size={args.batch_size}", f"max_steps={steps}", "log_every=1", f"checkpoint_every={steps}",
                 *MODES[mode], f"output_dir={run_dir}"]
    train(load_run_config(ROOT / config, parse_overrides(overrides)), load_teacher=load_teacher,
          build_student=build_student, log=lambda m: None)
    from torch._dynamo.utils import compilation_time_metrics, counters

    seconds = sum(sum(v) for k, v in compilation_time_metrics.items() if k == "_compile.compile_inner" or "bw_compiler" in k)
    (Path(run_dir) / "compile_stats.json").write_text(json.dumps({"compile_seconds": seconds,
                                                                  "graphs": counters["stats"]["unique_graphs"]}))


def run_one(args, config: str, mode: str, scratch: Path) -> dict:
    """Rows of one (config, mode) run: per-network losses and step seconds, and the process's wall time."""
    run_dir, cache = scratch / f"{Path(config).stem}_{mode}", scratch / f"inductor_{Path(config).stem}_{mode}"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, str(SCRIPT), "--worker", config, mode, str(run_dir),
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads)]
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses, seconds = {}, {}
    for r in rows:
        losses.setdefault(r["network"], []).append(r["loss"])
        seconds[r["step"]] = r["seconds_per_step"]
    step_seconds = [seconds[s] for s in sorted(seconds)]
    measured = step_seconds[args.warmup:]
    stats = json.loads((run_dir / "compile_stats.json").read_text())
    return {"losses": losses, "step_seconds": step_seconds, "wall_seconds": wall,
            "warmup_seconds": sum(step_seconds[:args.warmup]), "median_step_seconds": statistics.median(measured),
            "mean_step_seconds": statistics.mean(measured),
            "sd_step_seconds": statistics.stdev(measured) if len(measured) > 1 else 0.0,
            "compile_seconds": stats["compile_seconds"], "graphs": stats["graphs"]}


def loss_difference(run: dict, eager: dict) -> dict:
    """Largest per-step loss difference from eager over every network and step: absolute, and relative to that
    network's mean absolute eager loss (a loss that starts at 0, as SiD's generator loss, has no relative error)."""
    abs_d = rel_d = 0.0
    for name, values in eager["losses"].items():
        scale = max(statistics.mean(abs(a) for a in values), 1e-12)
        for a, b in zip(values, run["losses"][name]):
            abs_d, rel_d = max(abs_d, abs(b - a)), max(rel_d, abs(b - a) / scale)
    return {"max_abs_loss_difference": abs_d, "max_rel_loss_difference": rel_d}


def hardware() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", "").strip()
        flags = fields.get("Flags", "").split()
        info["bf16_instructions"] = [f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f in flags]
    except (OSError, subprocess.CalledProcessError):
        info["cpu"] = platform.processor()
    return info


def markdown(result: dict) -> str:
    hw = result["hardware"]
    lines = ["# Trainer step time: eager, compile: true, bf16 autocast", "",
             f"Command: `{result['command']}`", "",
             f"Date {result['date']}; torch {hw['torch']}; {hw.get('cpu', '')} ({hw['cpus']} CPUs; "
             f"{', '.join(hw.get('bf16_instructions', [])) or 'no avx2/avx512'}); {hw['platform']}; "
             f"{result['threads']} torch thread(s); batch {result['batch_size']}; {result['steps']} measured steps after "
             f"{result['warmup']} warm-up steps; cold inductor cache per run.", "",
             "| config | mode | step s (median; mean ± sd) | speed vs eager | warm-up s | compile s (graphs) | max abs Δloss "
             "| max rel Δloss |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['config']} | {row['mode']} | {row['median_step_seconds']:.3f}; {row['mean_step_seconds']:.3f} ± "
                     f"{row['sd_step_seconds']:.3f} | {row['speedup']:.2f}x | {row['warmup_seconds']:.1f} | "
                     f"{row['compile_seconds']:.1f} ({row['graphs']}) | {row['max_abs_loss_difference']:.2e} | "
                     f"{row['max_rel_loss_difference']:.2e} |")
    lines += ["", "Speed: eager median step time / this mode's. Warm-up s: the first steps' seconds. Compile s: dynamo + "
              "inductor compile time over the whole run (later recompiles, for new batch shapes, included), graphs: "
              "distinct graphs compiled. Δloss: per-step loss of every network against eager's over all steps (same seeds, "
              "same batches); relative: to that network's mean absolute eager loss.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="engine_compile_"))
    try:
        for config in args.configs:
            runs = {mode: run_one(args, config, mode, scratch) for mode in dict.fromkeys(["eager", *args.modes])}
            for mode in args.modes:
                r, e = runs[mode], runs["eager"]
                rows.append({"config": config, "mode": mode, **r, "speedup": e["median_step_seconds"] / r["median_step_seconds"],
                             **loss_difference(r, e)})
                print(f"{config} {mode}: {r['median_step_seconds']:.3f} s/step, compile {r['compile_seconds']:.1f} s, "
                      f"max rel loss difference {rows[-1]['max_rel_loss_difference']:.2e}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {"command": "python scripts/engine_compile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "hardware": hardware(), "threads": args.threads,
              "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "rows": rows}
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "compile.md").write_text(markdown(result))
    print(f"wrote {out / 'compile.json'} and {out / 'compile.md'}")
    return 0

