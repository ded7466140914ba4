"""Training step time and bench throughput, idle and under a competing CPU load, with the old and the new CPU defaults.

    python scripts/engine_threads.py [--config configs/distill/cd_mnist16.yaml] [--batch-size 32] [--steps 10]
        [--loads 0 1 2] [--bench-samples 1000] [--out results/engine]

Defaults compared (distill/core/cores.py):
- old: torch's own (intra- and inter-op threads = the machine's cores) and 4 DataLoader workers for the bench's
  feature extraction (what torch-fidelity asks for);
- new: threads = (usable cores - 1) / processes launched on this machine (at least 1), workers = cores - 1;
- all: the new defaults with ``--threads`` = every usable core (what keeping one core free costs when idle);
- passive: ``all`` with ``OMP_WAIT_POLICY=PASSIVE`` (OpenMP threads sleep at once instead of spinning).
A load of L is a background process of L busy torch threads (``distill.eval.engine_bench.competing_load``), started
by this script before each measurement and stopped after it. Step time: the median ``seconds_per_step`` of the
training steps after the first two (a run past ``--timeout`` keeps the steps it logged). Bench: samples per second of
``scripts/bench.py`` sampling the teacher with UniPC at 4 NFE and scoring FID (wall time of the command).

Goal (issue #34): under load, a step no slower than 1.5x the idle step time per core available, i.e.
t_loaded <= 1.5 x t_idle x C / (C - L) for a load of L < C busy threads on C usable cores. Writes
``<out>/threads.json`` and ``<out>/threads.md``. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distill.core.cores import DEFAULTS_ENV, WORKERS_ENV, usable_cores
from distill.eval.engine_bench import ROOT, competing_load, machine, machine_line, median_after, start, train_steps, write_results

SETTINGS = {  # environment changes of each setting, and extra command-line arguments of the training run and bench
    "old": ({DEFAULTS_ENV: "off", WORKERS_ENV: "4"}, []),
    "new": ({}, []),
    "all": ({}, ["--threads", str(usable_cores())]),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["--threads", str(usable_cores())]),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/distill/cd_mnist16.yaml")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="training steps per run (the first two are left out)")
    p.add_argument("--loads", type=int, nargs="+", default=[0, 1, 2], help="busy threads of the competing process")
    p.add_argument("--settings", nargs="+", default=["old", "new", "all"], choices=list(SETTINGS))
    p.add_argument("--bench-samples", type=int, default=1000, help="samples of the bench run (0: no bench runs)")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds a training run may take before it is stopped")
    p.add_argument("--out", type=Path, default=Path("results/engine"))
    return p.parse_args(argv)


def clean_env(changes: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
                                                            DEFAULTS_ENV, WORKERS_ENV, "LOCAL_WORLD_SIZE")}
    return {**env, "HF_HUB_OFFLINE": "1", **changes}


def bench_rate(env: dict, samples: int, out: Path, extra: list[str]) -> float:
    """Samples per second of one bench command (sampling and scoring), from its wall time."""
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--teacher", "mnist16", "--solvers", "unipc", "--nfe", "4",
           "--num-samples", str(samples), "--out", str(out), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return samples / (time.perf_counter() - t0)


def measure(args, log=print) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="engine_threads_") as tmp:
        for load in args.loads:
            for name in args.settings:
                changes, extra = SETTINGS[name]
                env = clean_env(changes)
                with competing_load(load):
                    run = train_steps(ROOT / args.config, Path(tmp) / f"run_{name}_{load}", args.steps,
                                      [f"batch_size={args.batch_size}"], env=env, timeout=args.timeout, extra_args=extra)
                    rate = (bench_rate(env, args.bench_samples, Path(tmp) / f"bench_{name}_{load}", extra)
                            if args.bench_samples else None)
                step = median_after(run["seconds"], 2)
                rows.append({"setting": name, "load_threads": load, "step_seconds": step, "steps_logged": len(run["seconds"]),
                             "finished": run["finished"], "bench_samples_per_second": rate})
                log(f"load {load} {name}: {step if step is None else round(step, 3)} s/step over {len(run['seconds'])} "
                    f"steps{'' if run['finished'] else ' (stopped at the timeout)'}; bench "
                    f"{'-' if rate is None else f'{rate:.1f} samples/s'}")
    cores = usable_cores()
    idle = {r["setting"]: r["step_seconds"] for r in rows if r["load_threads"] == 0}
    for r in rows:
        base, load = idle.get(r["setting"]), r["load_threads"]
        r["vs_idle"] = r["step_seconds"] / base if base and r["step_seconds"] else None
        r["limit_vs_idle"] = 1.5 * cores / (cores - load) if 0 < load < cores else None
        r["goal_met"] = None if r["limit_vs_idle"] is None or r["vs_idle"] is None else r["vs_idle"] <= r["limit_vs_idle"]
    return {"rows": rows, "usable_cores": cores}


def markdown(result: dict, command: str) -> str:
    m = result["machine"]
    lines = ["# Step time and bench throughput, idle and under load: old and new CPU defaults", "",
             f"Command: `{command}`", "", f"Hardware: {machine_line(m)}.", "",
             f"Training: `{result['config']}` at batch {result['batch_size']}, median seconds per step of steps 3-"
             f"{result['steps']}; bench: `scripts/bench.py --teacher mnist16 --solvers unipc --nfe 4 --num-samples "
             f"{result['bench_samples']}` (samples per second of the whole command). A load of L is one background process "
             f"of L busy torch threads. Goal: loaded / idle <= 1.5 x C / (C - L) on C = {result['usable_cores']} cores.", "",
             "| load (busy threads) | setting | s/step | vs idle | goal (vs idle) | bench samples/s |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        step = "-" if r["step_seconds"] is None else f"{r['step_seconds']:.3f}" + ("" if r["finished"] else " (timeout)")
        ratio = "-" if r["vs_idle"] is None else f"{r['vs_idle']:.2f}x"
        goal = "-" if r["limit_vs_idle"] is None else f"<= {r['limit_vs_idle']:.2f}x: {'met' if r['goal_met'] else 'not met'}"
        rate = "-" if r["bench_samples_per_second"] is None else f"{r['bench_samples_per_second']:.1f}"
        lines.append(f"| {r['load_threads']} | {r['setting']} | {step} | {ratio} | {goal} | {rate} |")
    lines += ["", "Settings: old = torch's defaults (threads = the machine's cores) and 4 bench DataLoader workers; new = "
              "(usable cores - 1) / processes threads (at least 1) and cores - 1 workers; all = new with --threads = every "
              "usable core; passive = all with OMP_WAIT_POLICY=PASSIVE.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = start(args.out, "engine_threads.py", argv)
    if command is None:
        return 1
    result = {"machine": machine(), "config": args.config, "batch_size": args.batch_size, "steps": args.steps,
              "bench_samples": args.bench_samples, "command": command}
    result.update(measure(args))
    write_results(args.out, "threads", result, markdown(result, command))
    return 0

