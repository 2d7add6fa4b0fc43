"""Counts of the requests and TCP connections that ended, per client, for ``GET /metrics``.

One call per request beside its access-log line (server/proxy.py,
server/tcp.py): the HTTP requests by status and their durations as a
histogram, the raw TCP connections by port and status, and the bytes from
and to visitors. Compiled with the request path, and written for it
(docs/performance.md, "Writing for the compiled build"): the 200s and the
sums are native integers. server/metrics.py writes them out when scraped.
"""

from __future__ import annotations

from typing import Final

#: upper bounds of the request duration histogram's buckets, in seconds:
#: Prometheus' defaults, and 30 and 60 for long polls and slow functions
#: (the type written out: mypyc leaves an inferred ``Final`` tuple unset for ``len``)
DURATION_BUCKETS_S: Final[tuple[float, ...]] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_BUCKETS: Final = len(DURATION_BUCKETS_S)
#: client names counted one by one; later ones are counted together under
#: OTHER_CLIENTS, so a token holder cycling names cannot grow the counts
#: (or a scrape) without bound
MAX_CLIENTS: Final = 256
OTHER_CLIENTS: Final = "_other"  # client names start with a letter or digit: no clash


class ClientCounts:
    """What one client's visitors have had since the exit server started."""

    __slots__ = ("buckets", "bytes_in", "bytes_out", "http", "ok", "seconds", "tcp")

    def __init__(self) -> None:
        #: HTTP requests answered 200, most of them: a native integer, no dictionary
        self.ok = 0
        #: HTTP requests by any other status
        self.http: dict[int, int] = {}
        #: raw TCP connections by (port, status)
        self.tcp: dict[tuple[int, int], int] = {}
        #: HTTP requests by the first bucket their duration fits in; the last: above all
        self.buckets: list[int] = [0] * (_BUCKETS + 1)
        #: the HTTP requests' durations added up
        self.seconds = 0.0
        #: bytes from visitors (request heads and bodies, TCP) and to them
        self.bytes_in = 0
        self.bytes_out = 0


class RequestCounts:
    """Counts of ended requests and TCP connections, per client (``-``: none served it)."""

    __slots__ = ("_last", "_last_name", "clients")

    def __init__(self) -> None:
        self.clients: dict[str, ClientCounts] = {}
        #: the counts last asked for, and the name they were asked by: a
        #: client's requests come with the same string, so most need no lookup
        self._last_name = ""  # no client's name: the first lookup finds no match
        self._last = ClientCounts()

    def http(self, client: str, status: int, bytes_in: int, bytes_out: int, seconds: float) -> None:
        """An HTTP request ended, with ``status``, ``seconds`` after its first byte.

        Per request, so written for the compiled build (docs/performance.md):
        the 200s and the sums in native integers, one list item boxed.
        """
        counts = self.of(client)
        if status == 200:
            counts.ok += 1
        else:
            statuses = counts.http
            statuses[status] = statuses.get(status, 0) + 1
        counts.bytes_in += bytes_in
        counts.bytes_out += bytes_out
        if seconds < 0.0:
            seconds = 0.0
        bucket = 0
        while bucket < _BUCKETS and seconds > DURATION_BUCKETS_S[bucket]:
            bucket += 1
        counts.buckets[bucket] += 1
        counts.seconds += seconds

    def tcp(self, client: str, port: int, status: int, bytes_in: int, bytes_out: int) -> None:
        """A raw TCP connection to ``port`` ended (status as its access-log line says)."""
        counts = self.of(client)
        key = (port, status)
        counts.tcp[key] = counts.tcp.get(key, 0) + 1
        counts.bytes_in += bytes_in
        counts.bytes_out += bytes_out

    def of(self, client: str) -> ClientCounts:
        """The counts of ``client``, made on first use."""
        if client is self._last_name:
            return self._last
        counts = self.clients.get(client)
        if counts is None:
            if len(self.clients) >= MAX_CLIENTS:
                client = OTHER_CLIENTS
                counts = self.clients.get(client)
            if counts is None:
                counts = ClientCounts()
                self.clients[client] = counts
        self._last_name = client
        self._last = counts
        return counts
