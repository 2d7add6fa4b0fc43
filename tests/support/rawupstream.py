"""A TCP upstream inside the test process: canned answers, and a record of what reached it."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from types import TracebackType

#: How long leaving the ``async with`` waits for the connections it closes to end.
CLOSE_TIMEOUT_S = 5.0


@dataclass
class RawUpstream:
    """Answers each request head with ``answer``; remembers every byte it was sent.

    ``async with await upstream.start():`` listens for the block, and on the
    way out closes every connection still open (a client may hold one in its
    pool), so no handler or transport outlives the test that made it.
    """

    answer: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    close_after: bool = True
    port: int = 0
    connections: int = 0
    received: bytearray = field(default_factory=bytearray)
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aenter__(self) -> RawUpstream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in self._writers:
            writer.close()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=CLOSE_TIMEOUT_S)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Note each connection as it is made: leaving the block closes it even if unserved."""
        self._writers.add(writer)
        handler = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            with contextlib.suppress(
                OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError
            ):
                head = await reader.readuntil(b"\r\n\r\n")
                self.received += head
                writer.write(self.answer)
                await writer.drain()
                while not self.close_after and (data := await reader.read(65536)):
                    self.received += data
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        finally:
            self._writers.discard(writer)
