"""The CPU cores this process may run on, and the DataLoader workers and torch threads sized to them.

``os.cpu_count()`` counts the machine's cores; a container, a job scheduler or ``taskset`` may allow the process
fewer (``os.sched_getaffinity``). Libraries size themselves by the first: torch-fidelity's feature loader asks for
min(4, 2 x cpu_count()) worker processes, which on a 2-core allowance is 4 processes fighting the main one for 2
cores (and PyTorch's warning "This DataLoader will create 4 worker processes in total").

Rule: ``loader_workers(cap) = max(0, min(cap, cores_per_process() - 1))``: one core of the process's share stays with
the main process, which runs the network, and a single core gets no worker at all (loading in the main process). The
environment variable ``DISTILL_NUM_WORKERS`` overrides it (a non-negative integer).

Commands (``scripts/distill.py``, ``scripts/bench.py``) size torch's pools with ``configure_threads``: the intra-op and
inter-op threads of each process are ``threads_per_process() = max(1, (usable_cores() - 1) // local_processes())`` -- one
core stays with the rest of the machine (the OS, data loading, another job), and accelerate / torchrun say in
``LOCAL_WORLD_SIZE`` how many processes share the others -- unless the config or the command line names a count, or the
environment's ``OMP_NUM_THREADS`` does (in that order). Why one core stays free (results/engine/threads.md, a 2-core
machine, consistency distillation of mnist16 at batch 32): torch's default of 2 threads took 0.60 s a step idle but 2.29 s
beside one busy thread and 2.3-23 s beside a busy 2-thread process, its OpenMP threads spinning at barriers for a core
the other process held; 1 thread took 0.71 s idle, 0.88 s and 1.06 s loaded. Passive OpenMP waits
(``OMP_WAIT_POLICY=PASSIVE``) removed the collapse too but made the idle 2-thread step 1.06 s, so they are not set.
``DISTILL_CPU_DEFAULTS=off`` keeps torch's own defaults (the benchmark's "old" column). Library calls
(``distill.engine.train.train``) leave a caller's torch settings alone.
"""

from __future__ import annotations

import os

WORKERS_ENV = "DISTILL_NUM_WORKERS"
DEFAULTS_ENV = "DISTILL_CPU_DEFAULTS"  # "off": torch's own thread counts


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the platform has one, else ``os.cpu_count()``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows: no affinity call
        return max(1, os.cpu_count() or 1)


def loader_workers(cap: int = 4) -> int:
    """DataLoader worker processes: ``DISTILL_NUM_WORKERS`` when set, else at most ``cap`` and one fewer than the usable
    cores (the main process keeps one)."""
    text = os.environ.get(WORKERS_ENV, "")
    if text:
        if not text.isdigit():
            raise ValueError(f"{WORKERS_ENV}={text!r} is not a worker count; allowed: a non-negative integer such as 0 or 2")
        return int(text)
    return max(0, min(cap, cores_per_process() - 1))


def local_processes() -> int:
    """Processes of this job on this machine: ``LOCAL_WORLD_SIZE`` (set by accelerate launch and torchrun), else 1."""
    text = os.environ.get("LOCAL_WORLD_SIZE", "")
    return max(1, int(text)) if text.isdigit() else 1


def cores_per_process() -> int:
    """This process's share of the usable cores (at least 1)."""
    return max(1, usable_cores() // local_processes())


def threads_per_process() -> int:
    """The default torch threads of a process: its share of the usable cores but one (at least 1; module doc)."""
    return max(1, (usable_cores() - 1) // local_processes())


def defaults_on() -> bool:
    """False when ``DISTILL_CPU_DEFAULTS=off``: torch's own thread counts."""
    return os.environ.get(DEFAULTS_ENV, "").lower() not in ("off", "0", "false", "no")


def thread_plan(threads: int | None = None, interop_threads: int | None = None) -> dict:
    """The intra-op and inter-op thread counts a command should use and where each comes from: an explicit count
    (config or command line), else ``OMP_NUM_THREADS``, else ``threads_per_process()``."""
    for name, value in (("threads", threads), ("interop_threads", interop_threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r} is not a thread count; allowed: a positive integer, or null for the "
                             f"default ({threads_per_process()}: the usable cores but one, shared by this machine's processes)")
    env = os.environ.get("OMP_NUM_THREADS", "")
    if threads is not None:
        intra, source = threads, "config or --threads"
    elif env.isdigit() and int(env) > 0:
        intra, source = int(env), "OMP_NUM_THREADS"
    else:
        intra = threads_per_process()
        source = f"{usable_cores()} usable cores, one kept free, {local_processes()} process(es) on this machine"
    return {"threads": intra, "interop_threads": interop_threads if interop_threads is not None else intra, "source": source}


def configure_threads(threads: int | None = None, interop_threads: int | None = None) -> dict:
    """Apply ``thread_plan`` to torch (a command's first act; ``DISTILL_CPU_DEFAULTS=off`` applies only explicit
    counts) and return it. The inter-op pool cannot be resized once used: then it keeps its size, and the plan says so."""
    import torch

    if not defaults_on() and threads is None and interop_threads is None:
        return {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
                "source": f"torch's defaults ({DEFAULTS_ENV}=off)"}
    plan = thread_plan(threads, interop_threads)
    torch.set_num_threads(plan["threads"])
    if torch.get_num_interop_threads() != plan["interop_threads"]:
        try:
            torch.set_num_interop_threads(plan["interop_threads"])
        except RuntimeError:  # "cannot set number of interop threads after parallel work has started"
            plan["interop_threads"] = torch.get_num_interop_threads()
    return plan


def describe(plan: dict) -> str:
    """One log line: the thread counts and where they came from."""
    return f"cpu threads: {plan['threads']} intra-op, {plan['interop_threads']} inter-op ({plan['source']})"
