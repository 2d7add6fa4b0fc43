"""What the benchmark records of the machine: the wake-up probe."""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.machine import wake_up_round_trip_us
from bench.report import _wake_up_text


def _children() -> set[str]:
    pid = os.getpid()
    return set(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


def test_the_wake_up_round_trip_is_measured_and_leaves_no_process_behind() -> None:
    before = _children()
    started = time.monotonic()
    round_trip = wake_up_round_trip_us(200)
    assert round_trip is not None
    # Two wake-ups and four system calls: more than nothing, far less than a timeout.
    assert 1 < round_trip < 100_000
    assert time.monotonic() - started < 10
    assert _children() <= before  # its echo has exited and been reaped


def test_the_header_names_the_round_trip_only_when_the_file_has_it() -> None:
    assert _wake_up_text(None) == ""
    assert _wake_up_text(48.6) == "; a round trip between two processes 48.6 us (two wake-ups)"
