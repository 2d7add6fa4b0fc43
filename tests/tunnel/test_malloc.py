"""glibc keeps the pages of freed message buffers instead of faulting in new ones."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the tuning is glibc's (mallopt)"
)

# Buffers the size of a message's payload, allocated and freed as a transfer does.
CHURN = """
import resource, sys
from tunnel.malloc import keep_freed_buffers
tuned = keep_freed_buffers() if sys.argv[1] == "tune" else False
held = []
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2000):
    held.append(bytes(256 * 1024))
    if len(held) > 4:
        del held[:3]
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def churn(mode: str, **env: str) -> tuple[bool, int]:
    clean = {
        key: value
        for key, value in os.environ.items()
        if key != "GLIBC_TUNABLES" and not key.startswith("MALLOC_")
    }
    result = subprocess.run(
        [sys.executable, "-c", CHURN, mode],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    tuned, faults = result.stdout.split()
    return tuned == "True", int(faults)


def test_freed_buffers_are_reused_rather_than_faulted_in_again() -> None:
    untuned, faults_untuned = churn("leave")
    tuned, faults_tuned = churn("tune")
    assert (untuned, tuned) == (False, True)
    assert faults_tuned * 4 < faults_untuned, (faults_tuned, faults_untuned)


@pytest.mark.parametrize(
    "setting",
    [
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"},
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
    ],
)
def test_the_users_own_malloc_settings_win(setting: dict[str, str]) -> None:
    tuned, _ = churn("tune", **setting)
    assert not tuned


# Freed allocations in holes below a live one at the heap's top: glibc keeps
# them (the tuned trim threshold even more so) until malloc_trim gives the
# free pages back.
HOLES = """
import sys
from tunnel.malloc import keep_freed_buffers, return_free_pages

def rss_kib():
    with open("/proc/self/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0])

keep_freed_buffers()
blocks = [bytes(4096) for _ in range(10_000)]  # 40 MiB from the heap, below mmap's threshold
del blocks[:-1]  # all but the last, which pins the heap's top
before = rss_kib()
returned = return_free_pages() if sys.argv[1] == "trim" else False
print(returned, before - rss_kib())
"""


def holes(mode: str) -> tuple[bool, int]:
    result = subprocess.run(
        [sys.executable, "-c", HOLES, mode], capture_output=True, text=True, check=True, timeout=60
    )
    returned, freed_kib = result.stdout.split()
    return returned == "True", int(freed_kib)


def test_free_pages_inside_the_heap_go_back_to_the_kernel() -> None:
    _, freed_untrimmed_kib = holes("leave")
    assert freed_untrimmed_kib < 1024, freed_untrimmed_kib  # without it, they stay
    returned, freed_kib = holes("trim")
    assert returned
    assert freed_kib > 30 * 1024, freed_kib
