"""Waiting on conditions with deadlines: never sleep to let things settle."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def wait_until(
    condition: Callable[[], object], within: float = 10.0, interval: float = 0.01
) -> None:
    """Return once ``condition()`` is true; fail the test after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s: {condition}")
        await asyncio.sleep(interval)


def wait_until_sync(
    condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {condition}")
        time.sleep(interval)
