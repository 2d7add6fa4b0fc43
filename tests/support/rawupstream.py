"""A TCP upstream inside the test process: canned answers, and a record of what reached it."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass
class RawUpstream:
    """Answers each request head with ``answer``; remembers every byte it was sent."""

    answer: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    close_after: bool = True
    port: int = 0
    connections: int = 0
    received: bytearray = field(default_factory=bytearray)

    async def start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            head = await reader.readuntil(b"\r\n\r\n")
            self.received += head
            writer.write(self.answer)
            await writer.drain()
            while not self.close_after and (data := await reader.read(65536)):
                self.received += data
        writer.close()
