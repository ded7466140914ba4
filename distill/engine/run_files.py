"""The trainer's run folder (``distill.engine.train`` runs the loop): which checkpoint to resume from, the refusal of a
resume whose config differs from the checkpoint's (other than ``max_steps`` and logging keys; a new stage from old
weights is ``init_from``), config.yaml, metrics.jsonl and the accelerate trackers, and the cost of a run read back
from its metrics."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import yaml

from distill.core.atomic import append_text, write_text
from distill.engine.checkpoint import (
    checkpoint_problem,
    complete_checkpoints,
    latest_valid_checkpoint,
    read_manifest,
    skipped_messages,
)
from distill.engine.config import ConfigError
from distill.engine.run_config import RunConfig
from distill.engine.run_setup import Run, trackers
from distill.engine.run_state import read_state

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"


# keys a resume may change: the run length, how it is logged and checkpointed, and how it computes (threads, compile)
RESUME_FREE_KEYS = ("max_steps", "log_every", "checkpoint_every", "keep_checkpoints", "tensorboard", "log_with", "output_dir",
                    "debug_nan_step", "threads", "interop_threads", "compile")


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def config_changes(saved: dict, current: dict, free_keys: tuple[str, ...] = RESUME_FREE_KEYS) -> list[str]:
    """Dotted keys whose values differ between two config dicts, the ``free_keys`` (top-level) left out."""
    a, b = flat(saved), flat(current)
    free = lambda k: k.split(".")[0] in free_keys or (k == "init_from_sha256" and b.get(k) is None)  # noqa: E731
    return sorted(k for k in set(a) | set(b) if not free(k) and a.get(k) != b.get(k))


def follow_move(saved: dict, current: dict) -> dict:
    """``saved`` (a config.yaml) with its ``teacher`` (``student:<file>``) and ``init_from`` paths that lay beside its run
    folder moved to where ``current`` has them, when ``current`` names the same files beside its own run folder: a chain
    folder of progressive rounds, moved or copied, refers to its own files."""
    old_root, new_root = Path(saved.get("output_dir") or ".").parent, Path(current.get("output_dir") or ".").parent
    out = dict(saved)
    for key, prefix in (("teacher", "student:"), ("init_from", "")):
        value = saved.get(key)
        if isinstance(value, str) and value.startswith(f"{prefix}{old_root}{os.sep}"):
            moved = f"{prefix}{new_root}{value[len(f'{prefix}{old_root}'):]}"
            out[key] = moved if moved == current.get(key) else value
    return out


def resolve_resume(out: Path, resume: str | None, log=print) -> Path | None:
    """The checkpoint to resume from: None (fresh run), ``latest`` (the newest valid one; damaged newer ones are
    skipped with a note each) or a checkpoint folder (refused, with the reason, when damaged)."""
    if resume is None:
        if complete_checkpoints(out / "checkpoints") or latest_valid_checkpoint(out / "checkpoints")[1]:
            raise ValueError(f"run folder {str(out)!r} already has checkpoints; resume with --resume latest or "
                             f"choose another --output-dir")
        return None
    if resume == "latest":
        found, skipped = latest_valid_checkpoint(out / "checkpoints")
        for message in skipped_messages(skipped):
            log(message)
        return found
    path = Path(resume)
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"{resume!r} is not a complete checkpoint folder (no manifest.json)")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"checkpoint {resume!r} cannot be resumed: {problem}")
    return path


def check_resume_config(cfg: RunConfig, ckpt: Path | None) -> None:
    """Refuse to resume with another config than the checkpoint's, or past ``max_steps``."""
    if ckpt is None:
        return
    step = read_manifest(ckpt)["step"]
    if step > cfg.max_steps:
        raise ConfigError(f"checkpoint {str(ckpt)!r} is at step {step}, beyond max_steps {cfg.max_steps}; resume with "
                          f"--max-steps {step} or more, or start a new run")
    saved_file = ckpt / CONFIG_FILE
    if not saved_file.is_file():  # checkpoints written before configs were kept in them
        return
    saved = yaml.safe_load(saved_file.read_text())
    if cfg.init_from_sha256 is None:
        cfg.init_from_sha256 = saved.get("init_from_sha256")
    saved = follow_move(saved, dataclasses.asdict(cfg))  # a moved chain folder (progressive rounds) resumes
    changed = config_changes(saved, dataclasses.asdict(cfg))
    if changed:
        shown = ", ".join(f"{k} ({flat(saved).get(k)!r} -> {flat(dataclasses.asdict(cfg)).get(k)!r})" for k in changed)
        raise ConfigError(f"the config differs from the one checkpoint {str(ckpt)!r} was trained with in {shown}; resume "
                          f"with the same config (only {', '.join(RESUME_FREE_KEYS[:4])} may change), or start a new run "
                          f"from its weights with init_from")


def restore(run: Run, ckpt: Path | None, log) -> int:
    if ckpt is None:
        return 0
    read_state(run, ckpt, log)  # tensors and JSON; nothing is unpickled (distill.engine.run_state)
    run.last_checkpoint = ckpt
    step = read_manifest(ckpt)["step"]
    log(f"resumed from {ckpt} at step {step}")
    return step


def open_run_files(run: Run, step: int, log=print) -> None:
    """config.yaml, metrics.jsonl (lines after ``step`` from an interrupted run dropped), TensorBoard."""
    if not run.accelerator.is_main_process:
        if trackers(run.cfg):
            run.accelerator.init_trackers("")  # a no-op off the main process, but every rank must call it
            run.trackers = True  # so that every rank calls end_training (which also ends its process group)
        return
    run.out.mkdir(parents=True, exist_ok=True)
    write_text(run.out / CONFIG_FILE, yaml.safe_dump(dataclasses.asdict(run.cfg), sort_keys=False))
    metrics = run.out / METRICS_FILE
    if metrics.is_file():
        kept = []
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line) if line else None
            except json.JSONDecodeError:  # a partial last line left by a kill
                log(f"note: dropped an unreadable line of {metrics} (a write interrupted by a kill)")
                continue
            if row is not None and row["step"] <= step:
                kept.append(line)
        write_text(metrics, "".join(line + "\n" for line in kept))

    names = trackers(run.cfg)
    if names:
        values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat(dataclasses.asdict(run.cfg)).items()}
        run.accelerator.init_trackers("", config=values, init_kwargs={"tensorboard": {"purge_step": step + 1}})
        run.trackers = True


def updates_and_seconds(folder: str | Path, up_to: int | None = None, network: str = "student") -> tuple[int, float]:
    """(updates, seconds) of a run folder from its metrics.jsonl: ``network``'s rows, each row's seconds per step times
    the steps since the row before; ``up_to``: only the first that many steps (a checkpoint exported from a longer run).
    A line cut short by a kill is skipped. The cost of a run for ``scripts/run_cost.py`` and progressive rounds."""
    path = Path(folder) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {folder}; pass the run folder a distillation wrote")
    seconds, last = 0.0, 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if row is None or row.get("network") != network:
            continue
        step = row["step"] if up_to is None else min(row["step"], up_to)
        if step > last:  # past up_to, rows add nothing
            seconds += row["seconds_per_step"] * (step - last)
            last = step
    if up_to is not None and last < up_to:
        raise ValueError(f"{folder} logged {last} steps, fewer than the {up_to} asked for")
    return last, seconds


def _mean_present(values: list[float]) -> float:
    """The mean of the values that are not NaN (a per-band statistic is NaN on a step whose batch missed the band); NaN
    when all are (a non-finite loss stops the run before it is logged)."""
    kept = [v for v in values if v == v]
    return sum(kept) / len(kept) if kept else float("nan")


def log_metrics(run: Run, step: int, stats: dict[str, dict], seconds: float, log) -> None:
    """Every ``log_every`` steps one metrics.jsonl row per network (the window's means), the log line and the trackers;
    a metrics file the disk refuses (full, read-only) raises ``OutputWriteError`` with the file left as it was."""
    for name, values in stats.items():
        run.history.setdefault(name, []).append(values)
    if step % run.cfg.log_every or not run.accelerator.is_main_process:
        return
    rows = {}
    for name, history in run.history.items():
        keys = [k for k in history[-1] if k != "lr"]  # a component that starts mid-window (a GAN switched on late)
        mean = lambda k: _mean_present([r[k] for r in history if k in r])  # noqa: E731  is averaged where present
        rows[name] = keys, {"step": step, "network": name, **{k: mean(k) for k in keys},
                            "lr": history[-1]["lr"], "seconds_per_step": seconds, "updates_averaged": len(history)}
    # whole lines or none: a full disk or a folder made read-only stops the run with one sentence (OutputWriteError)
    append_text(run.out / METRICS_FILE, "".join(json.dumps(row) + "\n" for _, row in rows.values()))
    for name, (keys, row) in rows.items():
        parts = " ".join(f"{k} {row[k]:.5g}" for k in keys if k not in ("loss", "grad_norm"))
        log(f"step {step}/{run.cfg.max_steps} {name}: loss {row['loss']:.5f} grad_norm {row['grad_norm']:.3g} "
            f"lr {row['lr']:.2e} {seconds:.3f} s/step" + (f" [{parts}]" if parts else ""))
        if run.trackers:
            run.accelerator.log({f"{name}/{key}": row[key] for key in (*keys, "lr")}, step=step)
    run.history = {}
