"""Limits kept per source address (docs/security.md).

Pure bookkeeping. :class:`AuthLimiter` rate-limits failed authentication:
the caller passes the time, and the table of addresses is bounded (least
recently seen forgotten first), so a flood of failures from many addresses
costs a fixed amount of memory. :class:`ConnectionsPerAddress` caps the
visitor connections one address holds open; its table holds only the
addresses with a connection open, so the global connection cap bounds it.
:class:`SendTimeout` drops a visitor that leaves our writes stalled.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
from collections.abc import Callable
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


#: Visitor connections one address may hold open by default: a quarter of
#: the default ``--max-connections``, far more than a browser (six per host)
#: or an office behind one NAT opens, too few for one host to take them all.
MAX_CONNECTIONS_PER_ADDRESS: Final = 256
#: An IPv6 visitor is counted by its /64: one host is given a whole /64.
IPV6_PREFIX: Final = 64
#: Addresses whose refusals are counted apart between two summaries in the
#: log; refusals from any more are in the total only.
MAX_REFUSED_ADDRESSES: Final = 1024


def address_key(address: str) -> str:
    """What a visitor's connections are counted under: its IPv4 address or its IPv6 /64.

    An IPv4 address mapped into IPv6 (a dual-stack socket) counts as the
    IPv4 address it is; anything that is no address counts as itself.
    """
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))


class Refusals:
    """Refusals under one limit: a running total, and by address since :meth:`take`.

    Addresses are told apart for the first MAX_REFUSED_ADDRESSES of them
    between two takes; refusals from any more count in the total only.
    """

    __slots__ = ("_from", "_since", "total")

    def __init__(self) -> None:
        self.total = 0
        self._since = 0
        self._from: collections.Counter[str] = collections.Counter()

    def count(self, address: str) -> None:
        """One refusal, of a connection from ``address``."""
        self.total += 1
        self._since += 1
        refused_from = self._from
        if address in refused_from or len(refused_from) < MAX_REFUSED_ADDRESSES:
            refused_from[address] += 1

    def take(self) -> tuple[int, collections.Counter[str]]:
        """The refusals since the last take, and those of the addresses told apart, by address.

        For the log's summary (server/app.py).
        """
        taken = self._since, self._from
        self._since, self._from = 0, collections.Counter()
        return taken


class ConnectionsPerAddress:
    """Counts the open visitor connections of each address against ``limit`` (0: no limit)."""

    def __init__(self, limit: int = MAX_CONNECTIONS_PER_ADDRESS) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}
        #: connections refused because their address held ``limit`` already
        self.refusals = Refusals()

    def __len__(self) -> int:
        return len(self._open)

    @property
    def refused(self) -> int:
        """Connections refused so far."""
        return self.refusals.total

    def admit(self, address: str) -> str | None:
        """Count one more connection from ``address``; return its key, or None if refused.

        With no limit every connection is admitted, and still counted (for
        ``GET /status``).
        """
        key = address_key(address)
        count = self._open.get(key, 0)
        if self.limit and count >= self.limit:
            self.refusals.count(key)
            return None
        self._open[key] = count + 1
        return key

    def release(self, key: str) -> None:
        """One connection admitted under ``key`` has closed."""
        count = self._open.pop(key, 0) - 1
        if count > 0:
            self._open[key] = count


class SendTimeout:
    """nginx's ``send_timeout`` for one visitor connection: ``on_stalled`` after a long stall.

    Without it a visitor that never reads would hold its connection, its
    stream and the upstream request for as long as it liked, and a closed
    connection's unsent bytes for ever (the kernel keeps probing a zero
    window). Stalled: the transport stayed above its high-water mark (64
    KiB) from :meth:`paused` on, with no :meth:`resumed` since, for
    ``timeout_s``. One timer per stall, not one per pause.
    """

    __slots__ = ("_loop", "_on_stalled", "_paused_at", "_timer", "timeout_s")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, timeout_s: float, on_stalled: Callable[[], None]
    ) -> None:
        self._loop = loop
        self.timeout_s = timeout_s
        self._on_stalled = on_stalled
        self._paused_at = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def paused(self) -> None:
        self._paused_at = now = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(now + self.timeout_s, self._check)

    def resumed(self) -> None:
        self._paused_at = 0.0  # the timer, if any, finds nothing to do

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if not self._paused_at:
            return
        due = self._paused_at + self.timeout_s
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._check)
            return
        self._on_stalled()
