"""Channel pairs for session tests: in memory, and a real websocket on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from tunnel.errors import ErrorCode, SessionClosed
from tunnel.session import MAX_RECEIVE_MESSAGE_BYTES, WebSocketChannel, ws_close_code


class MemoryChannel:
    """One end of an in-memory channel pair; bounded, so backpressure is real."""

    def __init__(self, inbox: asyncio.Queue[bytes | None], outbox: asyncio.Queue[bytes | None]):
        self._inbox = inbox
        self._outbox = outbox
        self.closed = False
        self.close_code: int | None = None
        self.peer: MemoryChannel | None = None

    @classmethod
    def pair(cls, depth: int = 16) -> tuple[MemoryChannel, MemoryChannel]:
        a_to_b: asyncio.Queue[bytes | None] = asyncio.Queue(depth)
        b_to_a: asyncio.Queue[bytes | None] = asyncio.Queue(depth)
        a, b = cls(b_to_a, a_to_b), cls(a_to_b, b_to_a)
        a.peer, b.peer = b, a
        return a, b

    async def send(self, message: bytes) -> None:
        if self.closed:
            raise SessionClosed(ErrorCode.INTERNAL_ERROR, "closed")
        await self._outbox.put(message)

    async def recv(self) -> bytes:
        message = await self._inbox.get()
        if message is None:
            self.closed = True
            code = self.peer.close_code if self.peer else None
            raise SessionClosed(
                ErrorCode.NO_ERROR if code == 1000 else ErrorCode.GOING_AWAY, "closed"
            )
        return message

    async def close(self, code: ErrorCode, reason: str) -> None:
        self.abort(ws_close_code(code))

    def abort(self, close_code: int = 1006) -> None:
        if not self.closed:
            self.closed = True
            self.close_code = close_code
            for queue in (self._outbox, self._inbox):
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(None)


@contextlib.asynccontextmanager
async def websocket_pair() -> AsyncIterator[tuple[WebSocketChannel, WebSocketChannel]]:
    """A client and a server channel over a real websocket on 127.0.0.1."""
    accepted: asyncio.Queue[ServerConnection] = asyncio.Queue()
    done = asyncio.Event()

    async def handler(connection: ServerConnection) -> None:
        await accepted.put(connection)
        await done.wait()

    options = {"compression": None, "ping_interval": None, "max_size": MAX_RECEIVE_MESSAGE_BYTES}
    async with serve(handler, "127.0.0.1", 0, **options) as server:  # type: ignore[arg-type]
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", **options) as client:  # type: ignore[arg-type]
            server_side = await accepted.get()
            try:
                yield WebSocketChannel(client), WebSocketChannel(server_side)
            finally:
                done.set()
