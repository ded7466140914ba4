"""Log lines beside tqdm progress bars: a line printed while a bar runs must not print over it.

The bars write to stderr (tqdm's default) and the log lines to stdout; on one terminal they share a line, so each
line is written with the active bars cleared first and redrawn after (``tqdm.external_write_mode``, as
``tqdm.write`` does), then flushed (a log read through a pipe sees it at once).
"""

from __future__ import annotations

from typing import Callable

from tqdm import tqdm


def _print(message: str) -> None:
    print(message, flush=True)


def above_bars(log: Callable[[str], None] = _print) -> Callable[[str], None]:
    """``log`` (default: print to stdout, flushed) wrapped so that each line goes above the active tqdm bars."""

    def write(message: str) -> None:
        with tqdm.external_write_mode():
            log(message)

    return write
