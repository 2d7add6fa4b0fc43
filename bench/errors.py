"""The one error the benchmark raises: something it needs could not be set up or measured."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class BenchError(Exception):
    """A setup step or a measurement failed; the message says which and why.

    ``python -m bench`` prints it on one line and exits with status 1.
    """


def run_command(prog: str, work: Callable[[], T]) -> tuple[int, T | None]:
    """Run a bench command's ``work``: its exit status, and what it returned (None on failure).

    SIGTERM leaves through the ``finally`` blocks, as Ctrl-C does, so every
    process ``work`` started is stopped by its PID either way. A
    :class:`BenchError` is printed on one line (status 1); an interruption
    says so (status 130).
    """
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return 0, work()
    except BenchError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1, None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; every process it started has been stopped")
        return 130, None


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
