"""Channel pairs for session tests: in memory, and a real websocket on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from tunnel.errors import ErrorCode
from tunnel.session import Channel
from tunnel.tls import Certificate, client_context, parse_fingerprint, server_context
from tunnel.websocket import ClientConnection, MessageHandler, ServerConnection


class MemoryChannel:
    """One end of an in-memory channel pair. Messages arrive on the next loop iteration.

    ``freeze()`` makes the link silent both ways without closing it, as a
    peer that lost power would be.
    """

    def __init__(self) -> None:
        self.handler: MessageHandler | None = None
        self.peer: MemoryChannel | None = None
        self.closed = False
        self.frozen = False
        self.close_code: ErrorCode | None = None
        self._loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()

    @classmethod
    def pair(cls) -> tuple[MemoryChannel, MemoryChannel]:
        a, b = cls(), cls()
        a.peer, b.peer = b, a
        return a, b

    @property
    def paused(self) -> bool:
        return False

    def send_message(self, parts: Sequence[bytes | memoryview]) -> None:
        peer = self.peer
        if self.closed or self.frozen or peer is None or peer.closed:
            return
        self._loop.call_soon(peer._deliver, b"".join(parts))

    def _deliver(self, message: bytes) -> None:
        if not self.closed and not self.frozen and self.handler is not None:
            self.handler.message_received(message)

    def close(self, code: ErrorCode, reason: str) -> None:
        self._end(code, reason)

    def abort(self) -> None:
        self._end(ErrorCode.INTERNAL_ERROR, "connection lost")

    def _end(self, code: ErrorCode, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        self._closed.set()
        if self.handler is not None:
            self._loop.call_soon(self.handler.channel_closed, code, reason)
        peer = self.peer
        if peer is not None and not peer.closed:
            peer.closed = True
            peer.close_code = code
            peer._closed.set()
            if peer.handler is not None:
                self._loop.call_soon(peer.handler.channel_closed, code, reason)

    def freeze(self) -> None:
        self.frozen = True
        if self.peer is not None:
            self.peer.frozen = True

    async def wait_closed(self) -> None:
        await self._closed.wait()


@contextlib.asynccontextmanager
async def websocket_pair(
    tls: Certificate | None = None,
) -> AsyncIterator[tuple[ClientConnection, ServerConnection]]:
    """A client and a server connection over a real websocket on 127.0.0.1.

    With ``tls``, over TLS (``wss://``) with that certificate, pinned by the client.
    """
    loop = asyncio.get_running_loop()
    opened: asyncio.Future[ServerConnection] = loop.create_future()
    server = await loop.create_server(
        lambda: ServerConnection(lambda c, r: None, lambda c, r: opened.set_result(c)),
        "127.0.0.1",
        0,
        ssl=server_context(tls.cert_path, tls.key_path) if tls else None,
    )
    port = server.sockets[0].getsockname()[1]
    handshake: asyncio.Future[None] = loop.create_future()
    scheme, pin = ("wss", parse_fingerprint(tls.fingerprint)) if tls else ("ws", None)
    client = ClientConnection(f"{scheme}://127.0.0.1:{port}/connect", {}, pin, handshake)
    await loop.create_connection(
        lambda: client, "127.0.0.1", port, ssl=client_context(pinned=True) if tls else None
    )
    await handshake
    server_side = await opened
    try:
        yield client, server_side
    finally:
        client.abort()
        server_side.abort()
        server.close()
        await server.wait_closed()


_: type[Channel] = MemoryChannel  # MemoryChannel satisfies the Channel protocol
