"""Which connected client serves which host, and each client's idle streams.

Routing (docs/architecture.md): a request's ``Host`` is normalised (lower
case, no port, no trailing dot) and matched exactly against the host names
clients registered; when none matches, a client that registered a default
route serves it. Several sessions may serve the same name, those of
different clients and a client's own connections (``--connections``): each
request goes to the session with the fewest exchanges under way, ties taken
in turn, and when one goes away the others carry on. So a download that
holds one of a client's connections does not hold back the requests that
come while it runs: they go to the others, and over a lossy uplink they do
not wait behind its lost packets.

A session replaces the one already connected with its client's name and
connection number, and every session of an older run of that client (a
different ``instance`` in its HELLO): after a power cut the old sessions
are ghosts.

Streams are reused like an HTTP proxy's upstream keep-alive connections: a
stream whose exchange ended cleanly goes back to its route's pool, most
recently used first, for at most :data:`POOL_IDLE_TIMEOUT_S`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Final, Protocol

from tunnel.errors import ErrorCode, StreamClosed, TunnelError
from tunnel.session import Session, Stream, StreamHandler

logger = logging.getLogger("homeport.server")

#: Idle pooled streams are retired after this long. Shorter than the
#: keep-alive timeout of common upstream servers (uvicorn and Node.js: 5 s),
#: so we close first and rarely race an upstream closing the connection.
POOL_IDLE_TIMEOUT_S: Final = 4.0
#: A retired stream whose upstream never closes is reset after this long.
RETIRE_TIMEOUT_S: Final = 10.0
DEFAULT_ROUTE: Final = ""

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def normalize_host(value: bytes | str) -> str | None:
    """A Host header value as a route key: lower case, no port, no trailing dot.

    Returns None for a value that is not a host name or IP literal. Results
    are cached: a server sees the same few Host values over and over.
    """
    cached = _HOST_CACHE.get(value)
    if cached is not None or value in _HOST_CACHE:
        return cached
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    result = _normalize_host(text)
    if len(_HOST_CACHE) >= _HOST_CACHE_SIZE:
        _HOST_CACHE.clear()
    _HOST_CACHE[value] = result
    return result


_HOST_CACHE: dict[bytes | str, str | None] = {}
_HOST_CACHE_SIZE: Final = 4096


def _normalize_host(value: str) -> str | None:
    host = value.strip().lower()
    if host.startswith("["):  # IPv6 literal, maybe with a port
        end = host.find("]")
        if end < 0:
            return None
        literal, rest = host[1:end], host[end + 1 :]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
        try:
            return f"[{ipaddress.IPv6Address(literal).compressed}]"
        except ValueError:
            return None
    name, sep, port = host.partition(":")
    if sep and not (port.isdigit() and len(port) <= 5):
        return None
    name = name.removesuffix(".")
    if not name or len(name) > 253:
        return None
    if not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return None
    return name


def valid_client_name(name: object) -> bool:
    return isinstance(name, str) and _CLIENT_NAME.fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class Route:
    """One host a client serves. ``host`` is ``""`` for the default route."""

    host: str
    #: the upstream's own host:port to send as Host, when the client asks for it
    host_rewrite: bytes | None = None
    #: path prefixes the public may reach; empty for all (server/paths.py)
    allow_paths: tuple[str, ...] = ()
    #: for a raw TCP port: the PROXY protocol version to open each connection with
    #: (server/proxy_protocol.py), 0 for none
    proxy_protocol: int = 0


class Kept(Protocol):
    """What an exchange leaves on a pooled stream for the next one (its response parser)."""

    def discard(self) -> None:
        """Never to be used again: let go of whatever ties it into reference cycles."""


class _Idle(StreamHandler):
    """Handler of a pooled stream between two exchanges."""

    __slots__ = ("client", "kept", "stream")

    def __init__(self, client: ConnectedClient, stream: Stream, kept: Kept | None) -> None:
        self.client = client
        self.stream = stream
        #: what the last exchange left for the next one on this stream (its parser)
        self.kept = kept

    def let_go(self) -> None:
        """The stream leaves the pool for good: what was kept for it is discarded."""
        kept = self.kept
        if kept is not None:
            self.kept = None
            kept.discard()

    def data_received(self, data: bytes | memoryview) -> None:
        # An idle upstream has nothing to say; bytes now mean it is confused.
        self.client.discard(self.stream)
        self.stream.reset(ErrorCode.CANCEL)

    def eof_received(self) -> None:
        # The upstream closed its keep-alive connection: close our side too.
        self.client.discard(self.stream)
        self.stream.write_eof()

    def stream_closed(self, exc: TunnelError | None) -> None:
        self.client.discard(self.stream)
        self.let_go()


class _Retiring(StreamHandler):
    """Handler of a stream we ended: waits for the upstream to close, bounded."""

    __slots__ = ("stream", "timer")

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.timer = asyncio.get_running_loop().call_later(
            RETIRE_TIMEOUT_S, stream.reset, ErrorCode.CANCEL
        )

    def stream_closed(self, exc: TunnelError | None) -> None:
        self.timer.cancel()


@dataclass(eq=False)
class ConnectedClient:
    """A client with an open session, as the exit server sees it."""

    name: str
    session: Session
    routes: dict[str, Route]
    remote_addr: str
    session_id: str
    max_streams: int
    #: the client process this session belongs to, unique per run (its HELLO's ``instance``)
    instance: str = ""
    #: which of the client's connections this is, and how many it keeps
    connection: int = 0
    connections: int = 1
    #: this client's sessions, this one among them, all of one instance: the
    #: registry's own list for the name (:meth:`Registry.add`); they share ``max_streams``
    siblings: list[ConnectedClient] = field(default_factory=list)
    connected_at: float = field(default_factory=time.time)
    #: per route, idle streams and since when (loop time), oldest first
    _idle: dict[str, dict[Stream, float]] = field(default_factory=dict)
    _sweeper: asyncio.TimerHandle | None = None
    #: looked up once: ``asyncio.get_running_loop()`` makes a getpid system call
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)

    def acquire(self, route: str, handler: StreamHandler) -> tuple[Stream, bool, Kept | None]:
        """A stream to ``route``'s upstream for one exchange: a pooled one if any.

        Returns the stream, whether it was reused, and what the exchange
        before on it left with :meth:`release` (``None`` for a new stream).

        Raises:
            StreamClosed: REFUSED_STREAM when the client's stream limit is reached
                or the session is closing.
        """
        idle = self._idle.get(route)
        while idle:
            stream, _ = idle.popitem()  # the most recently used: warmest, least likely stale
            if not (stream.is_closing() or stream.remote_ended):
                pooled = stream.handler
                stream.set_handler(handler)
                return stream, True, pooled.kept if isinstance(pooled, _Idle) else None
        if self.open_streams() >= self.max_streams:
            raise StreamClosed(0, ErrorCode.REFUSED_STREAM, "stream limit for this client")
        return self.session.open_stream(route, handler), False, None

    def release(self, stream: Stream, kept: Kept | None = None) -> None:
        """Put a stream whose exchange ended cleanly back in its route's pool.

        ``kept`` goes to the stream's next exchange (:meth:`acquire`).
        """
        if stream.is_closing() or stream.remote_ended or self.session.is_closing:
            if kept is not None:
                kept.discard()
            self.retire(stream)
            return
        stream.set_handler(_Idle(self, stream, kept))
        loop = self._loop
        self._idle.setdefault(stream.route, {})[stream] = loop.time()
        if self._sweeper is None:
            self._sweeper = loop.call_later(POOL_IDLE_TIMEOUT_S, self._sweep)

    def retire(self, stream: Stream) -> None:
        """End a stream that must not be reused, letting the upstream close gracefully."""
        self.discard(stream)
        if stream.closed:
            return
        pooled = stream.handler
        if isinstance(pooled, _Idle):
            pooled.let_go()
        stream.set_handler(_Retiring(stream))
        stream.write_eof()

    def discard(self, stream: Stream) -> None:
        """Take a stream out of the pool, if it is there."""
        idle = self._idle.get(stream.route)
        if idle is not None:
            idle.pop(stream, None)

    def _sweep(self) -> None:
        """Retire streams idle for POOL_IDLE_TIMEOUT_S; one timer per client, not per stream."""
        loop = self._loop
        oldest_allowed = loop.time() - POOL_IDLE_TIMEOUT_S
        stale = []
        for idle in self._idle.values():
            for stream, since in idle.items():
                if since > oldest_allowed:
                    break
                stale.append(stream)
        for stream in stale:
            self.retire(stream)
        self._sweeper = None
        if any(self._idle.values()):
            self._sweeper = loop.call_later(1.0, self._sweep)

    def idle_streams(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def open_streams(self) -> int:
        """Streams open on all of this client's connections."""
        siblings = self.siblings
        if len(siblings) < 2:
            return len(self.session.streams)
        return sum(len(sibling.session.streams) for sibling in siblings)

    def busy_streams(self) -> int:
        """Streams carrying an exchange now (open ones that are not pooled)."""
        return len(self.session.streams) - self.idle_streams()

    def close_pool(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for stream in list(idle):
                stream.reset(ErrorCode.CANCEL)
            idle.clear()


class Registry:
    """The connected clients' sessions, by client name and by the hosts they serve."""

    def __init__(self) -> None:
        self._by_name: dict[str, list[ConnectedClient]] = {}
        self._by_host: dict[str, list[ConnectedClient]] = {}
        self._turn = itertools.count()

    def __len__(self) -> int:
        return sum(len(sessions) for sessions in self._by_name.values())

    def clients(self) -> list[ConnectedClient]:
        """Every session, a client's in the order of its connection numbers."""
        return [
            client
            for sessions in self._by_name.values()
            for client in sorted(sessions, key=lambda c: c.connection)
        ]

    def get(self, name: str, connection: int = 0) -> ConnectedClient | None:
        for client in self._by_name.get(name, ()):
            if client.connection == connection:
                return client
        return None

    def add(self, client: ConnectedClient) -> list[ConnectedClient]:
        """Register a session; return those it replaces.

        It replaces its client's session with the same connection number,
        and every session of another instance with its client's name.
        """
        sessions = self._by_name.get(client.name, [])
        replaced = [
            old
            for old in sessions
            if old.instance != client.instance or old.connection == client.connection
        ]
        for old in replaced:
            self.remove(old)
        sessions = self._by_name.setdefault(client.name, [])  # all of one instance now
        sessions.append(client)
        client.siblings = sessions
        for host in client.routes:
            self._by_host.setdefault(host, []).append(client)
        return replaced

    def remove(self, client: ConnectedClient) -> None:
        """Forget a session (it ended); others serving its hosts carry on."""
        sessions = self._by_name.get(client.name)
        if sessions and client in sessions:
            sessions.remove(client)
            if not sessions:
                del self._by_name[client.name]
        for host in client.routes:
            serving = self._by_host.get(host)
            if serving and client in serving:
                serving.remove(client)
                if not serving:
                    del self._by_host[host]

    def lookup(self, host: str | None) -> tuple[ConnectedClient, str] | None:
        """The session and route for a normalised host; the default route if none matches.

        Of several sessions serving it, the one with the fewest exchanges
        under way; of those, the next in turn.
        """
        for key in (host, DEFAULT_ROUTE) if host else (DEFAULT_ROUTE,):
            client = self.lookup_route(key)
            if client is not None:
                return client, key
        return None

    def lookup_route(self, route: str) -> ConnectedClient | None:
        """The session for exactly ``route`` (a host, ``""`` or ``tcp:PORT``), as :meth:`lookup`."""
        serving = self._by_host.get(route)
        if not serving:
            return None
        if len(serving) == 1:
            return None if serving[0].session.is_closing else serving[0]
        live = [c for c in serving if not c.session.is_closing]
        if not live:
            return None
        busy = [c.busy_streams() for c in live]
        fewest = min(busy)
        least_busy = [live[i] for i, n in enumerate(busy) if n == fewest]
        return least_busy[next(self._turn) % len(least_busy)]
