"""Keep glibc from returning the tunnel's message buffers to the kernel between messages.

(And give back, once, what loading the program freed: ``return_free_pages``.)

A bulk transfer allocates and frees buffers of up to a few hundred KiB many
times a second. glibc's defaults serve the first ones with ``mmap`` and,
once it has raised its threshold, trims the top of the heap back to the
kernel whenever more than twice that lies free: every new buffer then comes
back as fresh pages the kernel must fault in and zero. Without it, a 100
MiB download cost the client 2.05 CPU seconds per GiB and the exit server
1.67; with it, about 1.1 each (docs/performance.md). Fixed thresholds,
above the largest message and a few buffers' worth, keep those pages in the
process.

This is the same tuning as ``GLIBC_TUNABLES=glibc.malloc.trim_threshold=…``;
when the environment already sets glibc's malloc tunables, they are left as
they are. On other C libraries this does nothing.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import ctypes

#: mallopt(3) parameters.
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
#: Allocations above this get their own mapping (messages are at most 2 MiB).
MMAP_THRESHOLD_BYTES: Final = 4 * 1024 * 1024
#: Free memory at the top of the heap beyond this goes back to the kernel.
TRIM_THRESHOLD_BYTES: Final = 8 * 1024 * 1024
_USER_SETTINGS: Final = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_buffers() -> bool:
    """Set glibc's trim and mmap thresholds; return whether they were set."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
        name in os.environ for name in _USER_SETTINGS
    ):
        return False
    libc = _glibc()
    if libc is None:
        return False
    import ctypes

    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(  # mallopt returns 1 on success
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def return_free_pages() -> bool:
    """Give the kernel back the heap's free pages, once; return whether any went.

    Loading the program (compiling dataclasses, building tables) frees much of
    what it allocated, in holes the raised trim threshold would keep: about
    1.6 MiB of an idle process's RSS. ``malloc_trim(0)`` releases free pages
    inside the heap as well as at its top.
    """
    libc = _glibc()
    if libc is None:
        return False
    import ctypes

    libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    return bool(libc.malloc_trim(0))


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, through ctypes (looked up once); None on other platforms and C libraries."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # here: only a process that runs a tunnel pays for it

    try:
        libc = ctypes.CDLL(None)  # the C library this Python runs on
        libc.malloc_trim  # noqa: B018 - glibc's own: musl has none (and a mallopt stub)
    except (OSError, AttributeError):
        return None
    return libc
