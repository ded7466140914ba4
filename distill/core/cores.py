"""The CPU cores this process may run on, and the DataLoader workers and torch threads sized to them.

``os.cpu_count()`` counts the machine's cores; a container, a job scheduler or ``taskset`` may allow the process
fewer (``os.sched_getaffinity``). Libraries size themselves by the first: torch-fidelity's feature loader asks for
min(4, 2 x cpu_count()) worker processes, which on a 2-core allowance is 4 processes fighting the main one for 2
cores (and PyTorch's warning "This DataLoader will create 4 worker processes in total").

Rule: ``loader_workers(cap) = max(0, min(cap, usable_cores() - 1))``: one core stays with the main process, which
runs the network, and a single usable core gets no worker at all (loading in the main process). The environment
variable ``DISTILL_NUM_WORKERS`` overrides it (a non-negative integer). torch's intra-op threads are capped at the
usable cores (``cap_torch_threads``; torch may count the machine's), never raised: ``OMP_NUM_THREADS`` or a caller's
``torch.set_num_threads`` below that stays.
"""

from __future__ import annotations

import os

WORKERS_ENV = "DISTILL_NUM_WORKERS"


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
    return max(0, min(cap, usable_cores() - 1))


def cap_torch_threads() -> int:
    """Lower torch's intra-op threads to the usable cores when it has more, and return the count."""
    import torch

    if torch.get_num_threads() > usable_cores():
        torch.set_num_threads(usable_cores())
    return torch.get_num_threads()
