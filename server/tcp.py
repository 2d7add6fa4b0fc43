"""Raw TCP tunnels: a public port whose connections are carried, byte for byte, to a client.

``homeport server --tcp-port 2222`` listens on port 2222 beside the HTTP
port. A client that serves it (``homeport client --tcp 2222=127.0.0.1:22``)
gets each connection made to it as a stream opened on the route
``tcp:2222`` (protocol.md §4.2), and dials its own upstream for it, as it
does for HTTP. Nothing is parsed: bytes, half-closes and the end pass as
they are, as the TCP tunnels of inlets-pro and frp carry them, so SSH, a
database, or a TLS server on the Pi that keeps its own certificates (Caddy
on 443) work through it unchanged. A reset passes as a reset, either way
(tunnel/sockets.py): a visitor that resets its connection resets the
upstream's, and an upstream that resets resets the visitor's.

A TCP visitor counts against the same limits as an HTTP one
(``--max-connections``, per address), has the same TCP keep-alive, and is
dropped by the same send timeout when it leaves our writes stalled. It has
no idle limit: an SSH session may sit quiet for hours. When no client
serves the port, or the client's upstream refuses, the visitor's
connection is reset, the nearest TCP has to "connection refused". Each
connection is one access-log line when it ends: ``"TCP :2222"``, status
200 when carried to its end, 502 (503, 504) as for an HTTP request when it
could not be.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, cast

from server.limits import SendTimeout
from server.proxy_protocol import header as proxy_header
from tunnel.errors import (
    HTTP_STATUS_FOR_CODE,
    SessionClosed,
    StreamClosed,
    StreamError,
    TunnelError,
)
from tunnel.frames import tcp_route
from tunnel.session import Stream, StreamHandler
from tunnel.sockets import reset_connection

if TYPE_CHECKING:
    from server.proxy import PublicServer

logger = logging.getLogger("homeport.server")


class TcpVisitor(asyncio.Protocol):
    """One visitor's connection to a TCP port, and the stream that carries it."""

    __slots__ = (
        "_address_key",
        "_bytes_in",
        "_bytes_out",
        "_client_name",
        "_ended",
        "_send_timeout",
        "_started_at",
        "_status",
        "_visitor_gone",
        "port",
        "server",
        "stream",
        "transport",
        "visitor_ip",
    )

    def __init__(self, server: PublicServer, port: int) -> None:
        self.server = server
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.stream: Stream | None = None
        self.visitor_ip = "-"
        self._address_key: str | None = None
        self._client_name = "-"
        self._started_at = time.monotonic()
        self._status = 200
        self._bytes_in = 0
        self._bytes_out = 0
        #: the visitor's connection was lost before the stream ended
        self._visitor_gone = False
        #: the stream ended: logged, counted out of the in-flight requests
        self._ended = False
        #: made when writes first pause
        self._send_timeout: SendTimeout | None = None

    # -- the visitor's side (asyncio protocol) ---------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's do not subclass it
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.visitor_ip = str(peer[0]) if peer else "-"
        server = self.server
        admitted = server.admit(self.visitor_ip)
        if isinstance(admitted, bytes):  # an HTTP answer: to a TCP visitor, a reset
            reset_connection(transport)
            return
        self._address_key = admitted
        server.tcp_connections.add(self)
        route = tcp_route(self.port)
        client = server.registry.lookup_route(route)
        if client is None:
            self._refuse(503)
            return
        self._client_name = client.name
        try:
            # Never pooled, so always a new stream, under the client's stream limit.
            self.stream, _, _ = client.acquire(route, _Carrier(self))
        except StreamClosed as exc:
            self._refuse(HTTP_STATUS_FOR_CODE.get(exc.code, 503))
            return
        served = client.routes.get(route)
        if served is not None and served.proxy_protocol:
            # Before any byte of the visitor's: who it is, for the upstream (not counted as in).
            self.stream.write(
                proxy_header(served.proxy_protocol, peer, transport.get_extra_info("sockname"))
            )
        server.exchange_started()

    def data_received(self, data: bytes) -> None:
        stream = self.stream
        if stream is not None and not stream.closed:
            self._bytes_in += len(data)
            stream.write(data)

    def eof_received(self) -> bool:
        stream = self.stream
        if stream is not None and not stream.closed:
            stream.write_eof()
            return True  # the other way may go on: a half-close passes as it is
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._send_timeout is not None:
            self._send_timeout.cancel()
            self._send_timeout = None  # it holds our bound method: no cycle left behind
        server = self.server
        server.tcp_connections.discard(self)
        if self._address_key is not None:
            server.per_address.release(self._address_key)
            self._address_key = None
        stream = self.stream
        if stream is not None and not stream.closed:
            # Gone before the stream ended (a reset, or our abort): the upstream goes too.
            self._visitor_gone = True
            stream.reset()
        self.transport = None

    def pause_writing(self) -> None:
        if self._send_timeout is None:
            loop = asyncio.get_running_loop()
            self._send_timeout = SendTimeout(loop, self.server.config.send_timeout_s, self._stalled)
        self._send_timeout.paused()
        if self.stream is not None:
            self.stream.pause_reading()

    def resume_writing(self) -> None:
        if self._send_timeout is not None:
            self._send_timeout.resumed()
        if self.stream is not None:
            self.stream.resume_reading()

    def _stalled(self) -> None:
        """The visitor left what we sent unread for the send timeout (as HTTP's): drop it."""
        logger.info(
            "a TCP visitor from %s to port %d left what we sent unread for %g s; dropped",
            self.visitor_ip,
            self.port,
            self.server.config.send_timeout_s,
        )
        self.abort()

    # -- the stream's side (stream handler) ------------------------------------------------

    def stream_data_received(self, data: bytes | memoryview) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self._bytes_out += len(data)
            transport.write(data)

    def stream_eof_received(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()

    def stream_closed(self, exc: TunnelError | None) -> None:
        self._end(exc)
        transport = self.transport
        if transport is None:
            return
        if exc is None:
            transport.close()  # both ways ended: what is written still goes
        else:
            reset_connection(transport)  # the upstream refused or failed: no clean end to tell

    def stream_pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def stream_resume_writing(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    # -- ending ------------------------------------------------------------------------------

    def _refuse(self, status: int) -> None:
        """No stream for this connection: log it and reset the visitor's connection."""
        self._status = status
        self._log()
        if self.transport is not None:
            reset_connection(self.transport)

    def _end(self, exc: TunnelError | None) -> None:
        if self._ended:
            return
        self._ended = True
        if self._visitor_gone:
            self._status = 200 if self._bytes_out else 499  # as an HTTP visitor that left
        elif isinstance(exc, StreamError | SessionClosed):
            self._status = HTTP_STATUS_FOR_CODE.get(exc.code, 502)
        elif exc is not None:
            self._status = 502
        self._log()
        self.server.exchange_ended()

    def _log(self) -> None:
        self.server.counts.tcp(
            self._client_name, self.port, self._status, self._bytes_in, self._bytes_out
        )
        self.server.access_log.record(
            self._client_name,
            b"TCP",
            b":%d" % self.port,
            None,
            self._status,
            self._bytes_in,
            self._bytes_out,
            self._started_at,
            time.monotonic(),
        )

    def abort(self) -> None:
        """Drop the connection now (shutdown's drain is over, or the visitor stalled)."""
        if self.transport is not None:
            self.transport.abort()

    def shut_down(self) -> None:
        """Server shutdown: a TCP connection is carried on until the drain time is up."""


class _Carrier(StreamHandler):
    """The stream's callbacks, passed to its visitor (whose own are the socket's)."""

    __slots__ = ("visitor",)

    def __init__(self, visitor: TcpVisitor) -> None:
        self.visitor = visitor

    def data_received(self, data: bytes | memoryview) -> None:
        self.visitor.stream_data_received(data)

    def eof_received(self) -> None:
        self.visitor.stream_eof_received()

    def stream_closed(self, exc: TunnelError | None) -> None:
        self.visitor.stream_closed(exc)

    def pause_writing(self) -> None:
        self.visitor.stream_pause_writing()

    def resume_writing(self) -> None:
        self.visitor.stream_resume_writing()
