"""The byte pipe: one stream from the exit server to one TCP connection to an upstream.

The client does no HTTP work: it dials the upstream its own configuration
names for the stream's route and copies bytes both ways, with no task per
stream once connected. Backpressure is passed straight through: a full
stream queue pauses reading the upstream, and an upstream that does not
read pauses the stream, which withholds credit from the exit server.
"""

from __future__ import annotations

import asyncio
import logging

from client.upstreams import Upstream
from tunnel.errors import ErrorCode, TunnelError
from tunnel.session import Stream, StreamHandler
from tunnel.sockets import reset_connection

logger = logging.getLogger("homeport.client")


class _UpstreamProtocol(asyncio.Protocol):
    """The TCP side of a :class:`Forwarder`."""

    __slots__ = ("forwarder",)

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder

    def data_received(self, data: bytes) -> None:
        self.forwarder.stream.write(data)

    def eof_received(self) -> bool:
        self.forwarder.stream.write_eof()
        return True  # keep sending what the server still has for the upstream

    def connection_lost(self, exc: Exception | None) -> None:
        self.forwarder.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.forwarder.stream.pause_reading()

    def resume_writing(self) -> None:
        self.forwarder.stream.resume_reading()


class Forwarder(StreamHandler):
    """Copies bytes between a stream and a TCP connection to its upstream."""

    __slots__ = ("_closed", "_connecting", "_upstream_gone", "stream", "transport", "upstream")

    def __init__(self, stream: Stream, upstream: Upstream, *, connect_timeout_s: float) -> None:
        self.stream = stream
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self._closed = False
        self._upstream_gone = False
        stream.pause_reading()  # bytes wait in the stream, within its window, until we connect
        self._connecting: asyncio.Task[None] | None = asyncio.get_running_loop().create_task(
            self._connect(connect_timeout_s), name=f"dial-upstream-{stream.stream_id}"
        )

    async def _connect(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        upstream = self.upstream
        try:
            async with asyncio.timeout(timeout_s):
                transport, _ = await loop.create_connection(
                    lambda: _UpstreamProtocol(self), upstream.host, upstream.port
                )
        except TimeoutError:
            logger.warning("upstream %s did not accept within %.0f s", upstream.url, timeout_s)
            self.stream.reset(ErrorCode.CONNECT_TIMEOUT)
            return
        except OSError as exc:
            logger.warning("cannot connect to upstream %s: %s", upstream.url, exc.strerror or exc)
            self.stream.reset(ErrorCode.CONNECT_REFUSED)
            return
        finally:
            self._connecting = None
        if self._closed:
            transport.abort()
            return
        self.transport = transport
        self.stream.resume_reading()

    # -- bytes from the exit server --------------------------------------------------

    def data_received(self, data: bytes | memoryview) -> None:
        if self.transport is not None:
            self.transport.write(data)
        elif self._upstream_gone:
            # The upstream closed its connection; these bytes cannot be
            # delivered, so fail the stream (the server may retry elsewhere).
            self.stream.reset(ErrorCode.UPSTREAM_RESET)

    def eof_received(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()

    def stream_closed(self, exc: TunnelError | None) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        transport = self.transport
        if transport is None:
            return
        if exc is None:
            transport.close()
        elif self.upstream.tcp_port is not None:
            reset_connection(transport)  # a raw TCP stream reset: a reset for the upstream too
        else:
            transport.abort()  # the visitor went away: drop the upstream request now

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # -- the upstream connection ended ------------------------------------------------

    def upstream_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._upstream_gone = True
        if self._closed:
            return
        if exc is not None:
            self.stream.reset(ErrorCode.UPSTREAM_RESET)
        else:
            self.stream.write_eof()
