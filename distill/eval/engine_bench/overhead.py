"""The trainer's per-step cost against a minimal hand-written loop of the same algorithm, phase by phase.

    python scripts/engine_overhead.py [--configs configs/distill/cd_mnist16.yaml configs/distill/sid_mnist16.yaml]
        [--batch-size 32] [--steps 10] [--rounds 3] [--threads 1] [--out results/engine]

For each config one process builds the run once (``distill.engine.train.start``: the same student, teacher, objective,
data and batch) and then alternates, ``--rounds`` times, ``--steps`` steps of the project's loop
(``distill.engine.train.run_steps``) with ``--steps`` steps of a minimal loop written here: the data rows, the objective's
``prepare`` (the teacher call) and ``loss``, ``backward``, gradient clipping, ``AdamW.step`` with the same settings, the
objective's ``after_update`` (a target network's EMA) and a ``torch._foreach_lerp_`` EMA of the student. Both use the
objective's own maths, so the difference is the engine: accelerate's wrapping, the finiteness checks, the
``requires_grad`` switching, the learning-rate schedule, metrics and the progress bar.

Phases of the trainer are timed by wrapping its functions (data and teacher: ``make_batch``; forward and backward:
``backward_micro_batches``; optimizer: the rest of ``update_network``; EMA and target: ``ema_update`` and
``after_update``; logging: ``log_metrics``; other: the rest of the loop). Checkpoints are excluded from the step time
(each round ends on one, ``run_steps``' stop) and reported amortized over the config's ``checkpoint_every``. Goal
(issue #34): trainer step <= 1.05x the minimal loop. Writes ``<out>/overhead.json`` and ``<out>/overhead.md``. Run it on
an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from distill.core.cores import configure_threads
from distill.engine import train as engine
from distill.engine.checkpoint import batch_indices, step_generator
from distill.engine.config import parse_overrides
from distill.engine.run_config import load_run_config
from distill.eval.engine_bench import ROOT, build_student, load_teacher, machine, machine_line, start, write_results
from distill.objectives.base import Batch, unwrap

PHASES = ("data", "teacher", "forward_backward", "optimizer", "ema_target", "logging", "other")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["configs/distill/cd_mnist16.yaml", "configs/distill/sid_mnist16.yaml"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="steps of each loop per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (both loops)")
    p.add_argument("--out", type=Path, default=Path("results/engine"))
    return p.parse_args(argv)


class PhaseClock:
    """Exclusive seconds per named phase: a phase entered inside another pauses it (the teacher's calls inside the
    loss count as teacher, not as forward and backward). ``wrap(owner, attr, phase)`` times a function attribute."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.stack: list[list] = []  # [phase, time it last resumed]

    @contextlib.contextmanager
    def phase(self, name: str):
        now = time.perf_counter()
        if self.stack:
            self.seconds[self.stack[-1][0]] += now - self.stack[-1][1]
        self.stack.append([name, now])
        try:
            yield
        finally:
            now = time.perf_counter()
            self.seconds[name] += now - self.stack.pop()[1]
            if self.stack:
                self.stack[-1][1] = now

    def wrap(self, owner, attr: str, phase: str):
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            with self.phase(phase):
                return original(*args, **kwargs)

        setattr(owner, attr, timed)
        return original


def trainer_round(run, step: int, steps: int, clock: PhaseClock) -> float:
    """``steps`` steps of the engine's loop from ``step``; returns their seconds without the checkpoint at the end."""
    before = dict(clock.seconds)
    t0 = time.perf_counter()
    engine.run_steps(run, step, step + steps, log=lambda m: None)
    total = time.perf_counter() - t0
    return total - (clock.seconds["checkpoint"] - before.get("checkpoint", 0.0))


def minimal_round(run, step: int, steps: int, opts: dict, ema: dict, clock: PhaseClock) -> float:
    """``steps`` steps of the minimal loop (see the module doc) on the run's networks, data and objective."""
    cfg, objective = run.cfg, run.objective
    nets = {n: unwrap(m) for n, m in run.nets.items()}
    params = {n: [p for p in m.parameters() if p.requires_grad] for n, m in nets.items()}
    t0 = time.perf_counter()
    for s in range(step, step + steps):
        with clock.phase("data"):
            batch = Batch(s, step_generator(cfg.seed, s, 0), torch.device("cpu"), cfg.batch_size)
            if run.data is not None:
                x0, labels = run.data.batch(batch_indices(s, cfg.batch_size, len(run.data), cfg.seed))
                batch.x0 = x0 if "data" in objective.needs else None
                batch.cond = labels if cfg.student.class_conditional else None
            with torch.no_grad():
                batch = objective.prepare(batch, nets)
        for name in objective.updates(s):
            with clock.phase("forward_backward"):
                for other, ps in params.items():
                    if other != name:
                        for p in ps:
                            p.requires_grad_(False)
                loss = objective.loss(name, nets, batch)
                loss = (loss["loss"] if isinstance(loss, dict) else loss).mean()
                loss.backward()
                for other, ps in params.items():
                    if other != name:
                        for p in ps:
                            p.requires_grad_(True)
            with clock.phase("optimizer"):
                if run.settings[name].grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params[name], run.settings[name].grad_clip)
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
            with clock.phase("ema_target"):
                objective.after_update(name, nets, s)
                if name == "student" and ema:
                    torch._foreach_lerp_(ema["ema"], ema["src"], 1.0 - cfg.ema_decay)
        with clock.phase("logging"):
            float(loss.detach())  # the one number a minimal loop prints
    return time.perf_counter() - t0


def measure_config(config: str, args, tmp: Path, log) -> dict:
    overrides = parse_overrides([f"batch_size={args.batch_size}", f"output_dir={tmp / Path(config).stem}",
                                 f"max_steps={10 ** 6}", "log_every=1"])
    cfg = load_run_config(ROOT / config, overrides)
    checkpoint_every = load_run_config(ROOT / config, {}).checkpoint_every  # the config's own interval, for amortizing
    run, step = engine.start(cfg, load_teacher, build_student, None, lambda m: None)
    trainer_clock, minimal_clock = PhaseClock(), PhaseClock()
    active = [trainer_clock]  # the clock of the loop running now: the teacher's network is shared by both
    teacher_net = next((getattr(run.ctx.teacher, a) for a in ("unet", "net", "model") if isinstance(getattr(run.ctx.teacher, a, None),
                                                                                                   torch.nn.Module)), None)
    if teacher_net is not None:
        teacher_forward = teacher_net.forward
        teacher_net.forward = lambda *a, **k: _timed(active[0], "teacher", teacher_forward, *a, **k)
    originals = [(engine, "make_batch", trainer_clock.wrap(engine, "make_batch", "data")),
                 (engine, "backward_micro_batches", trainer_clock.wrap(engine, "backward_micro_batches", "forward_backward")),
                 (engine, "update_network", trainer_clock.wrap(engine, "update_network", "update_network")),
                 (engine, "ema_update", trainer_clock.wrap(engine, "ema_update", "ema_target")),
                 (engine, "log_metrics", trainer_clock.wrap(engine, "log_metrics", "logging")),
                 (engine, "checkpoint", trainer_clock.wrap(engine, "checkpoint", "checkpoint"))]
    after_update = run.objective.after_update  # both loops call it: timed on the clock of the loop running
    run.objective.after_update = lambda *a, **k: _timed(active[0], "ema_target", after_update, *a, **k)
    opts = {n: torch.optim.AdamW([p for p in unwrap(m).parameters() if p.requires_grad], **_adam_settings(run.opts[n]))
            for n, m in run.nets.items()}
    ema = {}
    if run.ema is not None:
        ema = {"ema": [p.detach().clone() for p in run.ema.parameters()],
               "src": [p.detach() for p in unwrap(run.nets["student"]).parameters()]}
    trainer_times, minimal_times, checkpoints = [], [], 0
    try:
        for r in range(args.rounds):
            before, active[0] = trainer_clock.seconds["checkpoint"], trainer_clock
            trainer_times.append(trainer_round(run, step, args.steps, trainer_clock) / args.steps)
            checkpoints += trainer_clock.seconds["checkpoint"] > before
            step += args.steps
            active[0] = minimal_clock
            minimal_times.append(minimal_round(run, step, args.steps, opts, ema, minimal_clock) / args.steps)
            step += args.steps
            log(f"{config} round {r + 1}: trainer {trainer_times[-1]:.3f} s/step, minimal {minimal_times[-1]:.3f} s/step")
    finally:
        for owner, attr, original in originals:
            setattr(owner, attr, original)
        run.objective.after_update = after_update
        if teacher_net is not None:
            del teacher_net.forward
        run.lock.release()
    steps = args.rounds * args.steps
    t = trainer_clock.seconds
    trainer_phases = {"data": t["data"], "teacher": t["teacher"], "forward_backward": t["forward_backward"],
                      "optimizer": t["update_network"], "ema_target": t["ema_target"], "logging": t["logging"]}
    trainer_phases["other"] = sum(trainer_times) * args.steps - sum(trainer_phases.values())
    minimal_phases = {k: minimal_clock.seconds.get(k, 0.0) for k in PHASES if k != "other"}
    minimal_phases["other"] = sum(minimal_times) * args.steps - sum(minimal_phases.values())
    trainer, minimal = statistics.median(trainer_times), statistics.median(minimal_times)
    per_checkpoint = t["checkpoint"] / max(1, checkpoints)
    return {"config": config, "objective": cfg.objective["name"], "networks": list(run.nets), "batch_size": args.batch_size,
            "steps_per_round": args.steps, "rounds": args.rounds,
            "trainer_seconds_per_step": trainer, "minimal_seconds_per_step": minimal, "ratio": trainer / minimal,
            "trainer_rounds": trainer_times, "minimal_rounds": minimal_times,
            "trainer_phases_per_step": {k: v / steps for k, v in trainer_phases.items()},
            "minimal_phases_per_step": {k: v / steps for k, v in minimal_phases.items()},
            "checkpoint_seconds": per_checkpoint, "checkpoint_every": checkpoint_every,
            "checkpoint_amortized_per_step": per_checkpoint / checkpoint_every}


def _timed(clock, phase, fn, *args, **kwargs):
    with clock.phase(phase):
        return fn(*args, **kwargs)


def _adam_settings(opt: torch.optim.Optimizer) -> dict:
    g = opt.param_groups[0]
    return {"lr": g["lr"], "betas": g["betas"], "weight_decay": g["weight_decay"], "eps": g["eps"]}


def markdown(result: dict) -> str:
    lines = ["# Trainer overhead against a minimal loop", "", f"Command: `{result['command']}`", "",
             f"Hardware: {machine_line(result['machine'])}; {result['threads']} torch thread(s).", "",
             "Per step, median over rounds (each round: the trainer's steps then the minimal loop's, interleaved). Goal: "
             "trainer <= 1.05x the minimal loop, checkpoints excluded.", "",
             "| config | networks | batch | trainer s/step | minimal s/step | ratio | goal | checkpoint s (amortized per step) |",
             "|---|---|---|---|---|---|---|---|"]
    for c in result["configs"]:
        lines.append(f"| `{c['config']}` | {', '.join(c['networks'])} | {c['batch_size']} | {c['trainer_seconds_per_step']:.3f} | "
                     f"{c['minimal_seconds_per_step']:.3f} | {c['ratio']:.3f}x | {'met' if c['ratio'] <= 1.05 else 'not met'} | "
                     f"{c['checkpoint_seconds']:.2f} every {c['checkpoint_every']} steps "
                     f"({c['checkpoint_amortized_per_step'] * 1000:.1f} ms) |")
    lines += ["", "Phases, milliseconds per step (trainer / minimal):", "",
              "| config | " + " | ".join(PHASES) + " |", "|---|" + "---|" * len(PHASES)]
    for c in result["configs"]:
        cells = [f"{c['trainer_phases_per_step'][k] * 1000:.1f} / {c['minimal_phases_per_step'][k] * 1000:.1f}" for k in PHASES]
        lines.append(f"| `{Path(c['config']).stem}` | " + " | ".join(cells) + " |")
    lines += ["", "data: data rows and the objective's prepare (teacher calls excluded); teacher: the teacher network's "
              "forward calls, wherever the objective makes them; forward_backward: the objective's loss and backward, teacher "
              "calls excluded; optimizer: clipping, learning rate, AdamW step, the step's loss statistics; ema_target: the "
              "student EMA and the objective's after_update (an EMA target); logging: metrics rows and the log line (the "
              "minimal loop: one float of the loss); other: the rest of the loop (the progress bar, bookkeeping).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = start(args.out, "engine_overhead.py", argv)
    if command is None:
        return 1
    try:
        configure_threads(args.threads)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result = {"machine": machine(), "threads": args.threads, "command": command, "configs": []}
    with tempfile.TemporaryDirectory(prefix="engine_overhead_") as tmp:
        for config in args.configs:
            result["configs"].append(measure_config(config, args, Path(tmp), log=lambda m: print(m, flush=True)))
    write_results(args.out, "overhead", result, markdown(result))
    return 0

