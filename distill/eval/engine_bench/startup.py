"""Time from command to first training step, phase by phase, for the mnist16 configs.

    python scripts/engine_startup.py [--configs configs/distill/cd_mnist16.yaml configs/distill/sid_mnist16.yaml ...]
        [--repeats 2] [--out results/engine]

Each config is started ``--repeats`` times as ``scripts/distill.py`` would start it (the same imports, thread setup and
``distill.engine.train.train``), in a fresh process that stops when the first step begins. The first start of each
config runs with an empty file cache (``distill.core.file_cache``: the teacher's content hash and the parsed mnist16
digits are computed), the others with the cache it left ("warm": a second run of the same teacher). Phases, measured
from the process's creation time: python and imports; threads; accelerator; teacher (load and hash); student
(build); data; networks and the rest of setup (objective, optimizers, EMA copies); run files (resume check, lock,
config.yaml, metrics) and the objective's ``on_start``. Goal (issue #34): at most 10 s to the first step on an idle
machine. Writes ``<out>/startup.json`` and ``<out>/startup.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distill.eval.engine_bench import ROOT  # noqa: E402

PHASES = ("imports", "threads", "accelerator", "teacher", "student", "data", "networks", "run_files")
CONFIGS = ["configs/distill/cd_mnist16.yaml", "configs/distill/sid_mnist16.yaml", "configs/distill/progressive_mnist16.yaml"]
MARK = "ENGINE_STARTUP "


SCRIPT = ROOT / "scripts" / "engine_startup.py"  # the front end, run again for each child process


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=CONFIGS)
    p.add_argument("--repeats", type=int, default=2, help="starts per config: the first cold, the others warm")
    p.add_argument("--out", type=Path, default=Path("results/engine"))
    p.add_argument("--worker", nargs=2, metavar=("CONFIG", "RUN_DIR"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


class FirstStep(Exception):
    """Raised when the first step begins: the measurement ends there."""


def worker(config: str, run_dir: str) -> None:
    """Start one run as scripts/distill.py does and print the phase times (seconds since the process was created)."""
    import psutil

    created = psutil.Process().create_time()
    marks = {}
    import distill.data as data_module  # noqa: I001  the imports scripts/distill.py makes, timed together
    from distill.core.cores import configure_threads
    from distill.engine import train as engine
    from distill.engine.run_config import load_run_config
    from distill.eval.engine_bench import build_student
    from distill.eval.engine_bench import load_teacher

    marks["imports"] = time.time() - created
    spent = {p: 0.0 for p in PHASES}
    spent["imports"] = marks["imports"]

    def timed(phase, fn):
        def call(*args, **kwargs):
            t0 = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[phase] += time.time() - t0
        return call

    t0 = time.time()
    cfg = load_run_config(config, {"output_dir": run_dir})
    configure_threads(cfg.threads, cfg.interop_threads)
    spent["threads"] = time.time() - t0
    engine.make_accelerator = timed("accelerator", engine.make_accelerator)
    data_module.dataset_for = timed("data", data_module.dataset_for)

    def first_step(*args, **kwargs):
        raise FirstStep

    engine.make_batch = first_step
    setup = engine.setup
    t_setup = [0.0]

    def timed_setup(*args, **kwargs):
        t = time.time()
        try:
            return setup(*args, **kwargs)
        finally:
            t_setup[0] += time.time() - t

    engine.setup = timed_setup
    try:
        engine.train(cfg, load_teacher=timed("teacher", load_teacher), build_student=timed("student", build_student),
                     log=lambda m: None)
    except FirstStep:
        total = time.time() - created
    spent["networks"] = t_setup[0] - spent["teacher"] - spent["student"] - spent["data"]
    spent["run_files"] = total - sum(v for k, v in spent.items() if k != "run_files")
    print(MARK + json.dumps({"total": total, "phases": spent}), flush=True)


def measure(args, log=print) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="engine_startup_") as tmp:
        for config in args.configs:
            cache = Path(tmp) / f"cache_{Path(config).stem}"
            for r in range(args.repeats):
                env = {**os.environ, "DISTILL_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
                run_dir = Path(tmp) / f"run_{Path(config).stem}_{r}"
                proc = subprocess.run([sys.executable, str(SCRIPT), "--worker", config, str(run_dir)], env=env,
                                      capture_output=True, text=True, cwd=ROOT)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)), None)
                if line is None:
                    raise RuntimeError(f"the startup worker for {config} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
                result = json.loads(line[len(MARK):])
                rows.append({"config": config, "cache": "cold" if r == 0 else "warm", **result})
                log(f"{config} ({rows[-1]['cache']}): {result['total']:.2f} s to the first step")
    return rows


def markdown(result: dict) -> str:
    from distill.eval.engine_bench import machine_line

    lines = ["# Time from command to the first training step", "", f"Command: `{result['command']}`", "",
             f"Hardware: {machine_line(result['machine'])}.", "",
             "Seconds from process creation, per phase (cold: an empty file cache, so the teacher is hashed and mnist16 "
             "parsed; warm: the cache a first start left). Goal: at most 10 s on an idle machine.", "",
             "| config | cache | total | " + " | ".join(PHASES) + " | goal |", "|---|---|---|" + "---|" * (len(PHASES) + 1)]
    for r in result["rows"]:
        cells = " | ".join(f"{r['phases'][p]:.2f}" for p in PHASES)
        lines.append(f"| `{Path(r['config']).stem}` | {r['cache']} | {r['total']:.2f} | {cells} | "
                     f"{'met' if r['total'] <= 10 else 'not met'} |")
    lines += ["", "imports: the interpreter and the modules scripts/distill.py imports (torch, diffusers via the student "
              "and teacher packages); teacher: loading the teacher folder and its content hash; networks: the rest of setup "
              "(the objective, its networks' copies, optimizers, the EMA); run_files: resume check, folder lock, config.yaml "
              "and metrics files, the objective's on_start, up to the first step.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    from distill.eval.engine_bench import machine, start, write_results

    command = start(args.out, "engine_startup.py", argv)
    if command is None:
        return 1
    result = {"machine": machine(), "command": command, "rows": measure(args)}
    write_results(args.out, "startup", result, markdown(result))
    return 0

