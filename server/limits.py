"""Rate limiting failed authentication, per source address (docs/security.md).

Pure bookkeeping: the caller passes the time. The table of addresses is
bounded (least recently seen forgotten first), so a flood of failures from
many addresses costs a fixed amount of memory.
"""

from __future__ import annotations

import collections
from typing import Final

MAX_FAILURES: Final = 5
WINDOW_S: Final = 60.0
MAX_ADDRESSES: Final = 10_000


class AuthLimiter:
    """Refuses an address that failed authentication ``max_failures`` times within ``window_s``."""

    def __init__(
        self,
        max_failures: int = MAX_FAILURES,
        window_s: float = WINDOW_S,
        max_addresses: int = MAX_ADDRESSES,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._failures: collections.OrderedDict[str, collections.deque[float]] = (
            collections.OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._failures)

    def blocked(self, address: str, now: float) -> bool:
        """Whether ``address`` must be refused (429) without looking at its token."""
        times = self._failures.get(address)
        if times is None:
            return False
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[address]
            return False
        return len(times) >= self.max_failures

    def failed(self, address: str, now: float) -> None:
        """Count one failed attempt from ``address``."""
        times = self._failures.pop(address, None)
        if times is None:
            times = collections.deque(maxlen=self.max_failures)
        times.append(now)
        self._failures[address] = times
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        """A valid token from ``address`` clears its record."""
        self._failures.pop(address, None)
