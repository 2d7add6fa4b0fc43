"""The public side of the exit server: an HTTP/1.1 reverse proxy into tunnel streams.

Theory of operation
-------------------
Each visitor TCP connection is a :class:`VisitorConnection`, an asyncio
protocol around llhttp (``httptools``), the strict parser uvicorn uses. We
never parse HTTP by hand: llhttp frames messages, and this module adds what a
public edge needs on top (limits, Host and framing rules, timeouts).

Each request becomes an :class:`Exchange`, which borrows a stream from the
client serving the request's host (:mod:`server.registry`), writes an HTTP/1.1
request head and the body into it, and parses the upstream's response from
the stream with llhttp again, writing it to the visitor as it arrives. The
client on the other end only copies bytes between the stream and the
upstream's TCP connection, so all HTTP meaning lives here (DESIGN.md,
principle 5). A stream whose exchange ended cleanly goes back to a pool and
carries the next request, as a proxy reuses upstream keep-alive connections.

Backpressure runs both ways with no buffering beyond fixed bounds: a slow
visitor pauses the stream's reading (its credit is withheld, so the client
stops reading the upstream), and a stream whose send queue is full pauses
reading the visitor's socket.

A WebSocket upgrade becomes two byte pipes once the upstream answers
``101``; after that neither side is parsed again.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING, Final, cast

import httptools

from server import headers as h
from server.accesslog import AccessLog
from server.counts import RequestCounts
from server.limits import ConnectionsPerAddress, Refusals, SendTimeout
from server.listen import serve
from server.paths import path_allowed
from server.registry import ConnectedClient, Registry, normalize_host
from server.tcp import TcpVisitor
from tunnel.errors import (
    HTTP_STATUS_FOR_CODE,
    SessionClosed,
    StreamClosed,
    StreamError,
    TunnelError,
)
from tunnel.session import Stream, StreamHandler

if TYPE_CHECKING:
    from server.certificates import Challenges
    from server.config import ServerConfig

logger = logging.getLogger("homeport.server")
#: header kinds by name as sent (server/headers.py), read inline per header
_kind_as_sent: Final = h.KIND_AS_SENT

#: Requests parsed ahead of the one being answered (HTTP/1.1 pipelining).
#: More than this and the connection is closed after the queued ones.
MAX_PIPELINED_REQUESTS: Final = 32
#: How often late upstreams are looked for: response timeouts fire within this.
SWEEP_INTERVAL_S: Final = 0.5
#: Logged for a visitor who left before the response began (nginx's code).
CLIENT_CLOSED_REQUEST: Final = 499
#: Bytes a visitor may send after a WebSocket upgrade request before the
#: upstream has answered; beyond it we stop reading.
MAX_EARLY_UPGRADE_BYTES: Final = 64 * 1024
#: Lingering close (as nginx): after our last response, half-close and keep
#: reading, so a visitor still sending does not turn our close into a TCP
#: reset that destroys the response it has not read yet. Bounded both ways.
LINGER_S: Final = 2.0
LINGER_MAX_BYTES: Final = 1024 * 1024
_IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class _Reject(Exception):
    """Answer the visitor with ``status`` and close."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _BadResponse(Exception):
    """The upstream's response is malformed or over a limit: 502."""


class _HeadDone(Exception):
    """The head of a response to HEAD is complete; stop parsing."""


class _ExtraResponse(Exception):
    """The upstream began another response after the one we asked for; stop parsing."""


class _StopParsing(Exception):
    """Parse no further on this connection: answer what is queued, then close."""


class _Timer(enum.Enum):
    NONE = 0
    HEAD = 1  #: the request head must complete
    BODY = 2  #: the request body must keep coming
    KEEPALIVE = 3  #: an idle connection waits for its next request
    TUNNEL_IDLE = 4  #: an upgraded (WebSocket) connection must carry something


_PAUSE_PIPELINE: Final = 1
_PAUSE_STREAM: Final = 2
_PAUSE_UPGRADE: Final = 4


class _Request:
    """A parsed request head and, while it waits its turn, its body.

    A plain class, not a dataclass: one is made per request, and in the
    compiled build a dataclass's generated ``__init__`` stays interpreted.
    """

    __slots__ = (
        "block",
        "body_bytes",
        "buffered",
        "chunked",
        "complete",
        "exchange",
        "has_body",
        "host",
        "keep_alive",
        "method",
        "started_at",
        "target",
        "upgrade",
        "version",
    )

    def __init__(self, started_at: float) -> None:
        self.started_at = started_at
        self.target = b""
        self.block = h.HeaderBlock()
        self.method = b""
        self.version = "1.1"
        self.host: str | None = None
        self.keep_alive = True
        self.chunked = False
        self.has_body = False
        self.upgrade = False
        self.complete = False
        self.body_bytes = 0
        self.buffered: list[bytes] = []
        self.exchange: Exchange | None = None

    @property
    def retryable(self) -> bool:
        return self.method in _IDEMPOTENT and not self.has_body


class PublicServer:
    """The public HTTP listener: accepts visitors and tracks their connections."""

    def __init__(self, config: ServerConfig, registry: Registry) -> None:
        self.config = config
        self.registry = registry
        self.access_log = AccessLog()
        #: ended requests and TCP connections counted for /metrics
        self.counts = RequestCounts()
        self.connections: set[VisitorConnection] = set()
        #: visitors of the HTTPS port admitted and in their TLS handshake (server/https.py)
        self.tls_handshakes: set[VisitorConnection] = set()
        #: visitors of the raw TCP ports (server/tcp.py), under the same limits
        self.tcp_connections: set[TcpVisitor] = set()
        self.per_address = ConnectionsPerAddress(config.max_connections_per_address)
        #: connections refused because --max-connections were open
        self.refused_at_capacity = Refusals()
        self.in_flight = 0
        self.closing = False
        self._servers: list[asyncio.Server] = []
        self._drained: asyncio.Event | None = None
        #: exchanges waiting for a response head, with their deadlines, in
        #: deadline order (one timeout for all, so insertion order)
        self.awaiting_response: dict[Exchange, float] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        #: answers to an ACME CA's HTTP-01 challenges (--letsencrypt-domain)
        self.challenges: Challenges | None = None
        #: plain HTTP requests are redirected to HTTPS on this port (--https-redirect)
        self.https_redirect_port: int | None = None

    async def listen(self, host: str | None, port: int) -> list[tuple[str, int]]:
        """Start listening; return the bound addresses."""
        addresses = await self._serve(lambda: VisitorConnection(self), host, port)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_INTERVAL_S, self._sweep)
        return addresses

    async def listen_tcp(self, host: str | None, port: int) -> list[tuple[str, int]]:
        """Start listening on a raw TCP port (server/tcp.py); return the bound addresses."""
        return await self._serve(lambda: TcpVisitor(self, port), host, port)

    async def _serve(
        self, factory: Callable[[], asyncio.Protocol], host: str | None, port: int
    ) -> list[tuple[str, int]]:
        config = self.config
        servers, addresses = await serve(
            factory, host, port, keepalive_s=config.tcp_keepalive_s, backlog=config.backlog
        )
        self._servers += servers
        return addresses

    def open_connections(self) -> int:
        """Visitor connections open: HTTP, TCP, and HTTPS ones in their handshake."""
        return len(self.connections) + len(self.tcp_connections) + len(self.tls_handshakes)

    def admit(self, visitor_ip: str) -> str | bytes:
        """Admit a new visitor connection: its per-address key, or the HTTP answer refusing it.

        The same limits for HTTP and raw TCP visitors; refusals at capacity
        and per address are counted (the log's summary, ``GET /status``).
        """
        if self.closing:
            return h.error_response(503, text=h.SHUTTING_DOWN_TEXT)
        if self.open_connections() >= self.config.max_connections:
            self.refused_at_capacity.count(visitor_ip)
            return h.error_response(503, text=h.AT_CAPACITY_TEXT)
        key = self.per_address.admit(visitor_ip)
        if key is None:
            return h.error_response(429, text=h.TOO_MANY_FROM_ADDRESS_TEXT)
        return key

    def exchange_started(self) -> None:
        self.in_flight += 1

    def exchange_ended(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._drained is not None:
            self._drained.set()

    def _sweep(self) -> None:
        """Time out exchanges whose upstream is late; runs every second.

        One timer for all, rather than one per request (a timer costs more
        than the rest of an exchange's bookkeeping, docs/performance.md).
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        late = []
        for exchange, deadline in self.awaiting_response.items():
            if deadline > now:
                break
            late.append(exchange)
        for exchange in late:
            self.awaiting_response.pop(exchange, None)
            exchange.timed_out()
        self._sweeper = loop.call_later(SWEEP_INTERVAL_S, self._sweep)

    def begin_shutdown(self) -> None:
        """Stop accepting; close idle connections; busy ones close after their response."""
        self.closing = True
        for server in self._servers:
            server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in list(self.connections):
            connection.shut_down()
        # TCP visitors carry on until the drain time is up: nothing tells them to end.

    def write_buffer_bytes(self) -> int:
        """Bytes written to visitors and not yet taken by their sockets."""
        transports = [c.transport for c in self.connections]
        transports += [c.transport for c in self.tcp_connections]
        return sum(
            t.get_write_buffer_size() for t in transports if t is not None and not t.is_closing()
        )

    async def wait_drained(self) -> None:
        """Wait until no request is in flight."""
        if self.in_flight:
            self._drained = asyncio.Event()
            await self._drained.wait()

    def abort_all(self) -> None:
        """The drain time is up: answer what has no answer yet (503), drop the rest."""
        for connection in list(self.connections):
            exchange = connection._exchange
            if exchange is not None and not exchange.head_sent and not exchange.done:
                exchange._fail(503, text=h.SHUTTING_DOWN_TEXT)  # then the connection closes
            else:
                connection.abort()
        for tcp in list(self.tcp_connections):
            tcp.abort()


class VisitorConnection(asyncio.Protocol):
    """One visitor's TCP connection: parses requests, runs exchanges one at a time."""

    # Slots: one of each per open visitor connection and request (docs/performance.md).
    __slots__ = (
        "_address_key",
        "_closing",
        "_deadline",
        "_early_upgrade_bytes",
        "_exchange",
        "_heads_begun",
        "_in_head",
        "_lingered_bytes",
        "_lingering",
        "_loop",
        "_parser",
        "_parser_stopped",
        "_paused",
        "_queue",
        "_raw_head_bytes",
        "_request",
        "_send_timeout",
        "_timer",
        "_timer_kind",
        "_tunnel",
        "_visitor_ended",
        "config",
        "local_authority",
        "scheme",
        "server",
        "transport",
        "visitor_ip",
    )

    def __init__(self, server: PublicServer, address_key: str | None = None) -> None:
        self.server = server
        self.config = server.config
        self.transport: asyncio.Transport | None = None
        self.visitor_ip = ""
        #: what this connection is counted under per address, once admitted (on the
        #: HTTPS port as it was accepted, before its TLS handshake: server/https.py)
        self._address_key = address_key
        self.local_authority = b""
        #: "https" on the HTTPS port (X-Forwarded-Proto)
        self.scheme = "http"
        self._loop = asyncio.get_running_loop()
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._request: _Request | None = None
        self._exchange: Exchange | None = None
        self._queue: collections.deque[_Request] = collections.deque()
        self._tunnel: Exchange | None = None
        self._early_upgrade_bytes: bytearray | None = None
        self._closing = False
        self._lingering: asyncio.TimerHandle | None = None
        self._lingered_bytes = 0
        self._visitor_ended = False
        self._parser_stopped = False
        self._paused = 0
        #: made when writes first pause (most connections never do)
        self._send_timeout: SendTimeout | None = None
        self._in_head = False
        self._heads_begun = 0
        self._raw_head_bytes = 0
        self._timer_kind = _Timer.NONE
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; the cast is honest.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.visitor_ip = str(peer[0]) if peer else "-"
        default_port = 80
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
            default_port = 443
        local = transport.get_extra_info("sockname")
        if local:
            host = f"[{local[0]}]" if ":" in str(local[0]) else str(local[0])
            port = local[1]
            self.local_authority = (host if port == default_port else f"{host}:{port}").encode()
        server = self.server
        if self._address_key is None:
            admitted = server.admit(self.visitor_ip)
            if isinstance(admitted, bytes):
                transport.write(admitted)
                transport.close()
                return
            self._address_key = admitted
        else:  # admitted as it was accepted; its TLS handshake is done
            server.tls_handshakes.discard(self)
        server.connections.add(self)
        self._arm(_Timer.HEAD, self.config.head_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:
            self._lingered_bytes += len(data)
            if self._lingered_bytes > LINGER_MAX_BYTES:
                self.abort()
            return
        if self._tunnel is not None:
            self.tunnel_traffic()
            stream = self._tunnel.stream
            if stream is not None:
                stream.write(data)
            return
        if self._early_upgrade_bytes is not None:
            self._early_upgrade_bytes += data
            if len(self._early_upgrade_bytes) > MAX_EARLY_UPGRADE_BYTES:
                self._pause(_PAUSE_UPGRADE)
            return
        if self._parser_stopped:
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        head_continues = self._in_head
        request = self._request
        between_requests = not head_continues and (request is None or request.complete)
        heads_begun = self._heads_begun
        parser = self._parser
        assert parser is not None  # dropped only when the connection is lost
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade_requested(data[upgrade.args[0] :])
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Reject):
                self._reject(cause.status)
                return
            if isinstance(cause, _StopParsing):
                self._stop_parsing()
                return
            logger.error("request handling failed", exc_info=cause or exc)
            self._reject(500)
            return
        except httptools.HttpParserError:
            self._reject(400)
            return
        if self._in_head:
            # llhttp gathers a header's pieces until it completes, unseen by
            # our callbacks: bound the raw bytes of an unfinished head too, so
            # the limit holds however the bytes are split (docs/security.md).
            # Counted for reads that are all head: those that continue one,
            # and one that began it with nothing of another request before.
            # Any other read is bounded by itself.
            if head_continues:
                self._raw_head_bytes += len(data)
            elif between_requests and self._heads_begun == heads_begun + 1:
                self._raw_head_bytes = len(data)
            if self._raw_head_bytes > h.MAX_HEAD_BYTES + h.MAX_FIELD_BYTES:
                self._reject(431)

    def eof_received(self) -> bool:
        self._visitor_ended = True
        if self._lingering is not None:
            return False  # the visitor is done too: close now
        if self._tunnel is not None:
            stream = self._tunnel.stream
            if stream is not None:
                stream.write_eof()
            return True
        exchange = self._exchange
        if exchange is not None:
            # As nginx (499): a visitor who stops sending while being answered
            # has gone. A FIN cannot tell a half-close from a close, and an
            # abandoned SSE or long-poll visitor would otherwise hold its stream
            # and the upstream request until the upstream next writes.
            exchange.visitor_gone()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        # The parser holds our callbacks: drop it so the connection is freed
        # by reference counting, not left to the cyclic collector.
        self._parser = None
        self._parser_stopped = True
        self._disarm()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._send_timeout is not None:
            self._send_timeout.cancel()
            self._send_timeout = None  # it holds our bound method: no cycle left behind
        if self._lingering is not None:
            self._lingering.cancel()
        self.server.connections.discard(self)
        if self._address_key is not None:
            self.server.per_address.release(self._address_key)
            self._address_key = None
        for exchange in (self._exchange, self._tunnel):
            if exchange is not None:
                exchange.visitor_gone()
        self._exchange = self._tunnel = None
        self._queue.clear()

    def pause_writing(self) -> None:
        if self._send_timeout is None:
            self._send_timeout = SendTimeout(self._loop, self.config.send_timeout_s, self._stalled)
        self._send_timeout.paused()
        exchange = self._tunnel or self._exchange
        if exchange is not None and exchange.stream is not None:
            exchange.stream.pause_reading()

    def resume_writing(self) -> None:
        if self._send_timeout is not None:
            self._send_timeout.resumed()
        exchange = self._tunnel or self._exchange
        if exchange is not None and exchange.stream is not None:
            exchange.stream.resume_reading()

    # -- llhttp callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        self._request = _Request(monotonic())
        self._in_head = True
        self._heads_begun += 1
        self._raw_head_bytes = 0
        if self._timer_kind is _Timer.KEEPALIVE:
            self._arm(_Timer.HEAD, self.config.head_timeout_s)

    def on_url(self, url: bytes) -> None:
        request = self._request
        assert request is not None
        request.target += url
        if len(request.target) > h.MAX_TARGET_BYTES:
            raise _Reject(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self._request
        assert request is not None
        block = request.block
        size = len(name) + len(value)
        items = block.items
        if size > h.MAX_FIELD_BYTES or len(items) >= h.MAX_HEADERS or block.size > h.MAX_HEAD_BYTES:
            raise _Reject(431)
        # HeaderBlock.add, inline: this runs once per header of every request.
        items.append((name, value))
        block.size += size + 4
        kind = _kind_as_sent.get(name)
        if kind is None:
            kind = h.kind_of(name)
        block.kinds.append(kind)
        if kind:
            block.noted(kind, value)

    def on_headers_complete(self) -> None:
        request = self._request
        assert request is not None
        self._in_head = False
        parser = self._parser
        assert parser is not None  # we are inside its feed_data
        request.method = parser.get_method()
        request.version = parser.get_http_version()
        request.keep_alive = parser.should_keep_alive()
        self._validate(request, upgrade=parser.should_upgrade())
        # A request without a body is whole once its head is: an answer given
        # now (a 503, a 403) may keep the connection alive.
        request.complete = not request.has_body and not request.upgrade
        if request.has_body:
            self._arm(_Timer.BODY, self.config.body_timeout_s)
        else:
            self._disarm()
        if self._exchange is None and not self._queue:
            self._start(request)
        elif len(self._queue) >= MAX_PIPELINED_REQUESTS:
            raise _StopParsing
        else:
            self._queue.append(request)
            self._pause(_PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        request = self._request
        assert request is not None
        request.body_bytes += len(body)
        max_body = self.config.max_body_bytes
        if max_body is not None and request.body_bytes > max_body:
            raise _Reject(413)
        if self._timer_kind is _Timer.BODY:
            self._deadline = self._loop.time() + self.config.body_timeout_s
        if request.exchange is not None:
            request.exchange.send_body(body)
        else:
            request.buffered.append(body)

    def on_message_complete(self) -> None:
        request = self._request
        assert request is not None
        request.complete = True
        if self._timer_kind is _Timer.BODY:
            self._disarm()
        if request.exchange is not None:
            request.exchange.request_complete()

    # -- requests ------------------------------------------------------------------

    def _validate(self, request: _Request, *, upgrade: bool) -> None:
        """Refuse what a public edge must not pass on (docs/security.md, public edge)."""
        if request.version not in ("1.1", "1.0"):
            raise _Reject(505 if request.version >= "2" else 400)
        if request.method == b"CONNECT":
            raise _Reject(405)
        target = request.target
        if not (target.startswith(b"/") or (target == b"*" and request.method == b"OPTIONS")):
            raise _Reject(400)  # absolute-form: we are not a forward proxy
        block = request.block
        if block.size > h.MAX_HEAD_BYTES:
            raise _Reject(431)
        # block.values(), without a call and an empty list per kind absent
        special = block.special
        hosts = special.get(h.HOST)
        if hosts is None:
            if request.version == "1.1":
                raise _Reject(400)
        elif len(hosts) > 1:
            raise _Reject(400)
        else:
            request.host = normalize_host(hosts[0])
            if request.host is None:
                raise _Reject(400)
        codings = special.get(h.TRANSFER_ENCODING)
        lengths = special.get(h.CONTENT_LENGTH)
        if codings:
            if request.version != "1.1" or len(codings) != 1 or codings[0].lower() != b"chunked":
                raise _Reject(400)
            request.chunked = request.has_body = True
        elif lengths:
            length = int(lengths[0])  # llhttp accepted exactly one, all digits
            request.has_body = length > 0
            max_body = self.config.max_body_bytes
            if max_body is not None and length > max_body:
                raise _Reject(413)
        expect = special.get(h.EXPECT)
        if expect and (len(expect) > 1 or expect[0].lower() != b"100-continue"):
            raise _Reject(417)
        if upgrade:
            if not block.is_websocket_upgrade():
                # Only WebSocket may switch protocols through us (no h2c smuggling).
                raise _Reject(400)
            if not self.config.websocket_passthrough or request.has_body:
                raise _Reject(400)
            request.upgrade = True

    def _start(self, request: _Request) -> None:
        challenges = self.server.challenges
        if challenges is not None:
            answer = challenges.answer(request.host, request.target)
            if answer is not None:
                self._answer(request, *answer)
                return
        https_port = self.server.https_redirect_port
        host = request.host
        if (
            https_port is not None
            and self.scheme == "http"
            and host is not None
            and request.target.startswith(b"/")  # not OPTIONS *
        ):
            self._redirect_to_https(request, host, https_port)
            return
        routed = self.server.registry.lookup(request.host)
        if routed is None:
            self._answer_error(request, 503)
            return
        client, route = routed
        allowed = client.routes[route].allow_paths
        if allowed and not path_allowed(request.target, allowed):
            self._answer_error(request, 403)  # never reaches the client
            return
        exchange = Exchange(self, request, client, route)
        request.exchange = exchange
        self._exchange = exchange
        self.server.exchange_started()
        exchange.start()

    def _answer_error(self, request: _Request, status: int) -> None:
        """Answer a parsed request with an error ourselves; keep the connection if we safely can."""
        self._answer(request, status)

    def _answer(
        self,
        request: _Request,
        status: int,
        body: bytes | None = None,
        location: bytes | None = None,
    ) -> None:
        """Answer a parsed request ourselves: ``body`` as plain text, or the status's own."""
        keep_alive = request.keep_alive and request.complete and not self._closing
        head_only = request.method == b"HEAD"
        if body is None:
            response = h.error_response(status, keep_alive=keep_alive, head_only=head_only)
        else:
            response = h.plain_response(
                status, body, keep_alive=keep_alive, head_only=head_only, location=location
            )
        self.write(response)
        self.log(request, "-", status, 0, 0)
        self._request_done(keep_alive=keep_alive)

    def _redirect_to_https(self, request: _Request, host: str, port: int) -> None:
        """308 to the same URL over HTTPS: method and body kept, as RFC 9110 §15.4.9 says.

        ``host`` is normalized (a name or a bracketed IPv6 literal, no port)
        and llhttp let no space or control byte into the target, so both are
        safe in the header.
        """
        authority = host if port == 443 else f"{host}:{port}"
        location = b"https://" + authority.encode() + request.target
        self._answer(request, 308, b"308 moved to " + location + b"\n", location)

    def exchange_done(self, exchange: Exchange, *, keep_alive: bool) -> None:
        """The response was written (or the exchange failed): move to the next request."""
        if self._exchange is exchange:
            self._exchange = None
            self.server.exchange_ended()
            self._request_done(keep_alive=keep_alive and exchange.request.complete)
        elif self._tunnel is exchange:
            self._tunnel = None
            self.server.exchange_ended()
            self.close()

    def _request_done(self, *, keep_alive: bool) -> None:
        if not keep_alive or self._closing or self.server.closing:
            self.close()
            return
        if self._queue:
            request = self._queue.popleft()
            if not self._queue:
                self._resume(_PAUSE_PIPELINE)
            self._start(request)
            return
        self._arm(_Timer.KEEPALIVE, self.config.keepalive_timeout_s)

    def _upgrade_requested(self, tail: bytes) -> None:
        """llhttp paused after a WebSocket upgrade request; hold what follows."""
        self._early_upgrade_bytes = bytearray(tail)

    def enter_tunnel(self, exchange: Exchange) -> None:
        """The upstream switched protocols: from now on, bytes pass as they are."""
        self._exchange = None
        self._tunnel = exchange
        self._disarm()
        idle_s = self.config.websocket_idle_timeout_s
        if idle_s is not None:
            self._arm(_Timer.TUNNEL_IDLE, idle_s)
        early = self._early_upgrade_bytes or b""
        self._early_upgrade_bytes = None
        self._resume(_PAUSE_UPGRADE | _PAUSE_PIPELINE | _PAUSE_STREAM)
        if early and exchange.stream is not None:
            exchange.stream.write(bytes(early))

    def tunnel_traffic(self) -> None:
        """Bytes crossed the upgraded connection, either way: its idle deadline starts again.

        Only the deadline moves; the timer set when the tunnel opened finds
        it later when it fires and waits on (as every timer here does).
        """
        idle_s = self.config.websocket_idle_timeout_s
        if idle_s is not None:
            self._deadline = self._loop.time() + idle_s

    def _reject(self, status: int) -> None:
        """A request we refuse before it reaches any upstream: answer and close."""
        if self.transport is None or self.transport.is_closing():
            return
        request = self._request
        exchange = self._exchange
        if exchange is not None and exchange.request.complete:
            # The bad request came pipelined behind one being answered:
            # finish that one, then close (responses must stay in order).
            self._stop_parsing()
            return
        self._in_head = False
        if exchange is not None:
            # Bad framing or too much body in the middle of a streamed request.
            if not exchange.head_sent:
                self.write(h.error_response(status))
                exchange.status = status  # logged as answered
            exchange.abort()
        else:
            self.write(h.error_response(status))
            if request is not None:
                self.log(request, "-", status, request.body_bytes, 0)
        self.close()

    def _stop_parsing(self) -> None:
        self._parser_stopped = True
        self._closing = True
        self._queue.clear()
        self._pause(_PAUSE_PIPELINE)
        if self._exchange is None and self._tunnel is None:
            self.close()

    # -- flow control, timers, closing --------------------------------------------------

    def stream_paused(self) -> None:
        self._pause(_PAUSE_STREAM)

    def stream_resumed(self) -> None:
        self._resume(_PAUSE_STREAM)

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _arm(self, kind: _Timer, timeout_s: float) -> None:
        """Set the connection's one deadline; a later one just moves it (checked on firing)."""
        self._timer_kind = kind
        self._deadline = self._loop.time() + timeout_s
        timer = self._timer
        if timer is not None:
            if timer.when() <= self._deadline:
                return
            timer.cancel()
        self._timer = self._loop.call_at(self._deadline, self._on_timer)

    def _disarm(self) -> None:
        self._timer_kind = _Timer.NONE

    def _on_timer(self) -> None:
        self._timer = None
        kind = self._timer_kind
        if kind is _Timer.NONE or self.transport is None:
            return
        now = self._loop.time()
        if now < self._deadline or (kind is _Timer.BODY and self._paused & _PAUSE_STREAM):
            # Not yet due, or the body is stalled by our upstream, not the visitor.
            if self._deadline <= now:
                self._deadline = now + self.config.body_timeout_s
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
            return
        self._timer_kind = _Timer.NONE
        if kind is _Timer.HEAD and self._in_head:
            self._reject(408)
        elif kind is _Timer.BODY:
            exchange, request = self._exchange, self._request
            if request is not None and not (exchange is not None and exchange.head_sent):
                # Written before the exchange ends: its end closes the connection.
                self.write(h.error_response(408))
                if exchange is None:
                    self.log(request, "-", 408, request.body_bytes, 0)
                else:
                    exchange.status = 408  # logged so as it ends
            if exchange is not None:
                exchange.abort()
            self.close()
        elif kind is _Timer.TUNNEL_IDLE:
            logger.info(
                "a WebSocket of a visitor from %s carried nothing for %g s; closed",
                self.visitor_ip,
                self.config.websocket_idle_timeout_s,
            )
            if self._tunnel is not None:
                self._tunnel.abort()  # resets its stream, then closes this connection
            self.close()
        else:
            self.close()

    def _stalled(self) -> None:
        """The visitor left our writes stalled for ``--send-timeout``: drop it (SendTimeout)."""
        if self.transport is None:
            return
        timeout = self.config.send_timeout_s
        logger.info(
            "a visitor from %s left its response unread for %g s; dropped", self.visitor_ip, timeout
        )
        for exchange in (self._exchange, self._tunnel):
            if exchange is not None:
                exchange.abort()
        self.abort()

    def log(
        self, request: _Request, client: str, status: int, bytes_in: int, bytes_out: int
    ) -> None:
        """One access-log line for ``request`` (path without its query), and its counts."""
        server = self.server
        now = monotonic()
        server.counts.http(client, status, bytes_in, bytes_out, now - request.started_at)
        server.access_log.record(
            client,
            request.method,
            request.target.partition(b"?")[0],
            request.host,
            status,
            bytes_in,
            bytes_out,
            request.started_at,
            now,
        )

    def write(self, data: bytes | memoryview) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.writelines(parts)

    def write_eof(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()

    def close(self) -> None:
        """Close after what is written has been sent, lingering while the visitor sends."""
        self._closing = True
        self._disarm()
        transport = self.transport
        if transport is None or transport.is_closing() or self._lingering is not None:
            return
        if self._visitor_ended or not transport.can_write_eof():
            transport.close()  # nothing more can come from the visitor
            return
        transport.write_eof()
        self._parser_stopped = True
        self._paused = 0
        transport.resume_reading()
        self._lingering = self._loop.call_later(LINGER_S, transport.close)

    def abort(self) -> None:
        """Drop the connection now (a response cannot be completed)."""
        self._closing = True
        self._disarm()
        if self._lingering is not None:
            self._lingering.cancel()
        if self.transport is not None:
            self.transport.abort()

    def shut_down(self) -> None:
        """Server shutdown: close now if idle, else after the current response."""
        self._closing = True
        if self._exchange is None and self._tunnel is None:
            self.close()


class _ResponseReader:
    """llhttp's response parser for one stream, and the exchange it reads for now.

    A pooled stream keeps its reader from one exchange to the next (through
    :meth:`ConnectedClient.release`): making a parser binds each of its
    callbacks anew, which cost more than anything else per exchange.
    Reused only after llhttp itself read a response to its end, so it waits
    at the start of the next one.
    """

    __slots__ = ("exchange", "parser")

    def __init__(self, exchange: Exchange) -> None:
        self.exchange: Exchange | None = exchange
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)

    def discard(self) -> None:
        """Never to be used again: let go of the parser, which holds our callbacks.

        Otherwise the two would keep each other for the cyclic collector.
        """
        self.exchange = None
        self.parser = None

    # Each callback goes to the exchange of the moment, which is set for as
    # long as the parser is fed (Exchange._ended clears it).

    def on_message_begin(self) -> None:
        cast(Exchange, self.exchange).on_message_begin()

    def on_status(self, reason: bytes) -> None:
        cast(Exchange, self.exchange).on_status(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        cast(Exchange, self.exchange).on_header(name, value)

    def on_headers_complete(self) -> None:
        cast(Exchange, self.exchange).on_headers_complete()

    def on_body(self, body: bytes) -> None:
        cast(Exchange, self.exchange).on_body(body)

    def on_message_complete(self) -> None:
        cast(Exchange, self.exchange).on_message_complete()


class Exchange(StreamHandler):
    """One request and its response, carried on one stream to the upstream."""

    # Slots: one of each per open visitor connection and request (docs/performance.md).
    __slots__ = (
        "_block",
        "_chunked_out",
        "_close_delimited",
        "_got_response_bytes",
        "_head_only",
        "_keep_alive",
        "_length",
        "_length_left",
        "_message_complete",
        "_out",
        "_parsed_whole",
        "_parser",
        "_reader",
        "_reason",
        "_upstream_keep_alive",
        "attempts",
        "bytes_out",
        "client",
        "connection",
        "done",
        "head_sent",
        "request",
        "reused",
        "route",
        "status",
        "stream",
    )

    def __init__(
        self, connection: VisitorConnection, request: _Request, client: ConnectedClient, route: str
    ) -> None:
        self.connection = connection
        self.request = request
        self.client = client
        self.route = route
        self.stream: Stream | None = None
        self.reused = False
        self.attempts = 0
        self.head_sent = False
        self.done = False
        self.status = 0
        self.bytes_out = 0
        #: the stream's response reader, once the exchange has a stream
        self._reader: _ResponseReader | None = None
        self._parser: httptools.HttpResponseParser | None = None
        #: llhttp read the response to its end (and so is ready for the next)
        self._parsed_whole = False
        self._reason = b""
        self._block = h.HeaderBlock()
        self._got_response_bytes = False
        self._chunked_out = False
        self._close_delimited = False
        self._keep_alive = False
        self._upstream_keep_alive = False
        self._message_complete = False
        self._head_only = False
        self._out: list[bytes] = []
        #: the response's Content-Length, once its head says one
        self._length: int | None = None
        #: body bytes still to come, once llhttp has read the head: the rest
        #: goes to the visitor without being parsed
        self._length_left = 0

    # -- request side ------------------------------------------------------------------

    def start(self, *, fresh: bool = False) -> None:
        request = self.request
        config = self.connection.config
        self.attempts += 1
        kept: object = None
        try:
            if fresh:
                self.stream = self.client.session.open_stream(self.route, self)
                self.reused = False
            else:
                self.stream, self.reused, kept = self.client.acquire(self.route, self)
        except StreamClosed:
            self._fail(503)
            return
        reader = kept if isinstance(kept, _ResponseReader) else _ResponseReader(self)
        reader.exchange = self
        self._reader = reader
        self._parser = reader.parser  # a pooled reader is never a discarded one
        route = self.client.routes.get(self.route)
        self.stream.write(
            h.upstream_request_head(
                request.method,
                request.target,
                request.block,
                visitor_ip=self.connection.visitor_ip,
                proto=self.connection.scheme,
                host_rewrite=route.host_rewrite if route else None,
                chunked=request.chunked,
                upgrade=request.upgrade,
                default_host=self.connection.local_authority,
            )
        )
        for body in request.buffered:
            self.send_body(body)
        request.buffered.clear()
        if request.complete:
            self.request_complete()
        server = self.connection.server
        server.awaiting_response.pop(self, None)  # a retry goes to the back
        server.awaiting_response[self] = self.connection._loop.time() + config.response_timeout_s

    def send_body(self, body: bytes) -> None:
        stream = self.stream
        if stream is None or stream.closed:
            return
        if self.request.chunked:
            stream.write(b"%x\r\n" % len(body))
            stream.write(body)
            stream.write(b"\r\n")
        else:
            stream.write(body)

    def request_complete(self) -> None:
        stream = self.stream
        if self.request.chunked and stream is not None and not stream.closed:
            stream.write(b"0\r\n\r\n")

    # -- stream handler ------------------------------------------------------------------

    def data_received(self, data: bytes | memoryview) -> None:
        if self.done:
            return
        if self.connection._tunnel is self:
            self.connection.tunnel_traffic()
            self.connection.write(data)
            self.bytes_out += len(data)
            return
        if self._length_left:
            self._pass_body(data)
            return
        self._got_response_bytes = True
        parser = self._parser
        assert parser is not None  # dropped only when done
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._flush_out()
            self._switch_protocols(bytes(data[upgrade.args[0] :]))
            return
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadDone):
                self._flush_out()
                self._head_only = True
                self._message_complete = True
                self._finish()
                return
            if isinstance(exc.__context__, _ExtraResponse):
                self._drop_extra_bytes()
                return
            if not isinstance(exc.__context__, _BadResponse):
                logger.error("response handling failed", exc_info=exc.__context__ or exc)
            self._bad_response()
            return
        except httptools.HttpParserError:
            if self._message_complete:
                # llhttp refuses any byte after a complete response that said
                # Connection: close; that response stands.
                self._drop_extra_bytes()
            else:
                self._bad_response()
            return
        self._flush_out()
        if self._message_complete:
            self._finish()
        elif self._length is not None and self.head_sent:
            self._length_left = self._length - self.bytes_out

    def _pass_body(self, data: bytes | memoryview) -> None:
        """The rest of a Content-Length body: to the visitor as it comes, not parsed.

        llhttp would only count these bytes, copying each piece into a new
        object on the way (the exit server's costliest copy in a download).
        What follows the body's last byte is what llhttp would have called
        a second response: dropped the same way.
        """
        left = self._length_left
        size = len(data)
        if size < left:
            self._length_left = left - size
            self.bytes_out += size
            self.connection.write(data)
            return
        self._length_left = 0
        self.bytes_out += left
        self._message_complete = True
        if size == left:
            self.connection.write(data)
            self._finish()
        else:
            self.connection.write(data[:left])
            self._drop_extra_bytes()

    def _drop_extra_bytes(self) -> None:
        """The upstream began more after a complete response: finish that one, drop the rest.

        llhttp starts a new message at the first byte after a complete one,
        whatever it is, so ``on_message_begin`` sees every such case.

        As nginx: what follows a complete response is never passed on (it
        would answer the visitor's next request), and that upstream
        connection is not used again.
        """
        logger.warning(
            "an upstream of client %s sent more than the response; dropped", self.client.name
        )
        self._upstream_keep_alive = False
        self._flush_out()
        self._finish()

    def eof_received(self) -> None:
        if self.done:
            return
        if self.connection._tunnel is self:
            self.connection.write_eof()
            return
        if self.head_sent and self._close_delimited:
            self._message_complete = True
            self._finish()
        elif not self.head_sent:
            self._upstream_failed(502)
        else:
            self._truncated()

    def stream_closed(self, exc: TunnelError | None) -> None:
        if self.done:
            return
        if self.connection._tunnel is self:
            self.done = True
            self._log()
            self._ended(keep_alive=False)
            return
        if not self.head_sent:
            status = 502
            if isinstance(exc, StreamError | SessionClosed):
                status = HTTP_STATUS_FOR_CODE.get(exc.code, 502)
            if isinstance(exc, SessionClosed):
                self._fail(status)  # the whole session is gone, not a stale pooled stream
            else:
                self._upstream_failed(status)
        elif self._close_delimited and exc is None:
            self._message_complete = True
            self._finish()
        else:
            self._truncated()

    def pause_writing(self) -> None:
        self.connection.stream_paused()

    def resume_writing(self) -> None:
        self.connection.stream_resumed()

    # -- llhttp callbacks (response) ----------------------------------------------------

    def on_message_begin(self) -> None:
        if self._message_complete:
            raise _ExtraResponse

    def on_status(self, reason: bytes) -> None:
        self._reason += reason
        if len(self._reason) > 512:
            raise _BadResponse

    def on_header(self, name: bytes, value: bytes) -> None:
        block = self._block
        # HeaderBlock.add, inline: this runs once per header of every response.
        # The head's size bounds what we hold; the count is checked once, at its end.
        size = block.size + len(name) + len(value) + 4
        if size > h.MAX_RESPONSE_HEAD_BYTES:
            raise _BadResponse
        block.size = size
        block.items.append((name, value))
        kind = _kind_as_sent.get(name)
        if kind is None:
            kind = h.kind_of(name)
        block.kinds.append(kind)
        if kind:
            block.noted(kind, value)

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # we are inside its feed_data
        status = parser.get_status_code()
        request = self.request
        connection = self.connection
        if not 100 <= status <= 599 or len(self._block.items) > h.MAX_RESPONSE_HEADERS:
            raise _BadResponse
        if status < 200 and status != 101:
            if request.version == "1.1":
                self._out.append(h.informational_head(status, self._reason, self._block))
            self._reason, self._block = b"", h.HeaderBlock()
            return
        if status == 101 and not request.upgrade:
            raise _BadResponse
        self.status = status
        self._cancel_timer()
        # Only meaningful while this message is current: llhttp resets after it.
        self._upstream_keep_alive = parser.should_keep_alive()
        http10 = request.version == "1.0"
        block = self._block
        head_only = request.method == b"HEAD" or status in (204, 304)
        if status == 101:
            framing, keep_alive = h.Framing.NONE, False
        elif head_only:
            framing = h.Framing.NONE if status == 204 else h.Framing.HEAD
            keep_alive = request.keep_alive
        else:
            codings = block.special.get(h.TRANSFER_ENCODING)  # block.values(), inline
            if codings:
                if len(codings) != 1 or codings[0].strip().lower() != b"chunked":
                    raise _BadResponse  # a transfer coding we would pass on undecoded
                self._chunked_out = not http10
            elif lengths := block.special.get(h.CONTENT_LENGTH):
                framing = h.Framing.LENGTH
                self._length = int(lengths[0])  # llhttp allows one, of digits only
            else:
                self._close_delimited = True
                self._chunked_out = not http10
            if self._chunked_out:
                framing = h.Framing.CHUNKED
            elif codings or self._close_delimited:
                framing = h.Framing.CLOSE
            keep_alive = request.keep_alive and framing != h.Framing.CLOSE
        # After a refused upgrade llhttp parses nothing more: close then.
        keep_alive = keep_alive and request.complete and not request.upgrade
        keep_alive = keep_alive and not connection._closing
        self._keep_alive = keep_alive
        self._out.append(
            h.visitor_response_head(
                status,
                self._reason,
                block,
                framing=framing,
                keep_alive=keep_alive,
                http10_visitor=http10,
                upgrade=status == 101,
            )
        )
        self.head_sent = True
        if request.method == b"HEAD" and status != 101:
            raise _HeadDone

    def on_body(self, body: bytes) -> None:
        self.bytes_out += len(body)
        if self._chunked_out:
            self._out += (b"%x\r\n" % len(body), body, b"\r\n")
        else:
            self._out.append(body)

    def on_message_complete(self) -> None:
        if self.status:  # the final response, not an informational one
            self._message_complete = True
            self._parsed_whole = True

    def _flush_out(self) -> None:
        if self._out:
            self.connection.writelines(self._out)
            self._out = []

    # -- endings ---------------------------------------------------------------------------

    def _finish(self) -> None:
        """The response is complete: end it, and reuse the stream if both sides allow."""
        self.done = True
        self._cancel_timer()
        if self._chunked_out:
            self.connection.write(b"0\r\n\r\n")
        stream = self.stream
        if stream is not None:
            if not self.request.complete:
                # An early answer (a 401 or 413 before the upload ended): the
                # upstream may still wait for the body we will not send.
                stream.set_handler(StreamHandler())
                stream.reset()
            elif (
                not self._head_only
                and not self._close_delimited
                and self._upstream_keep_alive
                and not stream.remote_ended
            ):
                reader = self._reader if self._parsed_whole else None
                if reader is not None:
                    # Handed on with the stream: the next exchange on it sets itself.
                    reader.exchange = None
                    self._reader = None
                self.client.release(stream, reader)
            else:
                self.client.retire(stream)
        self._log()
        self._ended(keep_alive=self._keep_alive)

    def _switch_protocols(self, upstream_tail: bytes) -> None:
        self.connection.enter_tunnel(self)
        if upstream_tail:
            self.bytes_out += len(upstream_tail)
            self.connection.write(upstream_tail)

    def timed_out(self) -> None:
        """The upstream has not answered within the response timeout."""
        if not self.head_sent and not self.done:
            if self.stream is not None:
                self.stream.reset()
            self._fail(504)

    def _upstream_failed(self, status: int) -> None:
        """The stream failed before any response: retry once if that is safe, else answer."""
        if (
            self.reused
            and self.attempts == 1
            and self.request.retryable
            and self.request.complete
            and not self._got_response_bytes
        ):
            # A pooled stream whose upstream had just closed its keep-alive
            # connection: the request never reached it, so try a fresh stream.
            stale = self.stream
            if stale is not None:
                stale.set_handler(StreamHandler())
                stale.reset()
            self.start(fresh=True)
            return
        self._fail(status)

    def _bad_response(self) -> None:
        if self.stream is not None:
            self.stream.reset()
        if self.head_sent:
            self._truncated()
        else:
            self._out.clear()
            self._fail(502)

    def _fail(self, status: int, *, text: str | None = None) -> None:
        """Answer the visitor with an error of ours; the upstream gave nothing usable."""
        if self.done:
            return
        self.done = True
        self.status = status
        self._cancel_timer()
        if self.stream is not None and not self.stream.closed:
            self.stream.reset()
        request = self.request
        keep_alive = request.keep_alive and request.complete and not self.connection._closing
        self.connection.write(
            h.error_response(
                status, keep_alive=keep_alive, head_only=request.method == b"HEAD", text=text
            )
        )
        self._log()
        self._ended(keep_alive=keep_alive)

    def _truncated(self) -> None:
        """The response broke off after its head: the visitor must see it fail."""
        self.done = True
        self._cancel_timer()
        if self.stream is not None:
            self.stream.reset()
        self._log()
        self._ended(keep_alive=False)
        self.connection.abort()

    def abort(self) -> None:
        """The request failed on the visitor's side: abandon the upstream request."""
        if self.done:
            return
        self.done = True
        self._cancel_timer()
        if self.stream is not None and not self.stream.closed:
            self.stream.reset()
        self._log()
        self._ended(keep_alive=False)

    def visitor_gone(self) -> None:
        """The visitor disconnected: reset the stream so the upstream request is aborted.

        Logged as 499 (nginx's "client closed request") when no response had
        begun.
        """
        if not self.done and not self.head_sent:
            self.status = CLIENT_CLOSED_REQUEST
        self.abort()

    def _ended(self, *, keep_alive: bool) -> None:
        """Hand the visitor's connection on to its next request.

        Drops the references that tie this exchange into cycles (its parser's
        bound callbacks, the request's link back), so it is freed at once by
        reference counting rather than by the cyclic garbage collector, whose
        pauses grew with the load. Nothing of the request reaches it after
        this: an exchange that ends before its request body does closes the
        visitor's connection, which reads no further.
        """
        reader = self._reader
        if reader is not None:  # not handed on with a pooled stream (_finish)
            reader.discard()
            self._reader = None
        self._parser = None
        self.request.exchange = None
        self.connection.exchange_done(self, keep_alive=keep_alive)

    def _cancel_timer(self) -> None:
        self.connection.server.awaiting_response.pop(self, None)

    def _log(self) -> None:
        request = self.request
        self.connection.log(
            request, self.client.name, self.status, request.body_bytes, self.bytes_out
        )
