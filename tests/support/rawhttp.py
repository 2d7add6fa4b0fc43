"""A raw HTTP/1.1 client for tests: exact request bytes out, exact response fields in.

Higher-level clients normalise what the conformance tests must see as it is
(the request target, header case and order, repeated headers, framing), so
the tests write bytes to a socket and read the answer with llhttp.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from dataclasses import dataclass, field

import httptools


@dataclass
class RawResponse:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    informational: list[int] = field(default_factory=list)
    chunked: bool = False
    #: False when the connection closed before the framing said the body ended
    complete: bool = True

    def header(self, name: str) -> bytes | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[bytes]:
        wanted = name.lower().encode()
        return [value for key, value in self.headers if key.lower() == wanted]


class _Reader:
    """llhttp callbacks: every complete response, queued in order, 1xx noted on the way."""

    def __init__(self, head_only: bool) -> None:
        self.head_only = head_only
        self.parser = httptools.HttpResponseParser(self)
        self.informational: list[int] = []
        self.send_body_now = False
        self.done: collections.deque[RawResponse] = collections.deque()
        self._fresh()

    def _fresh(self) -> None:
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.chunked = False
        self.status = 0
        self.head_done = False

    def on_message_begin(self) -> None:
        self._fresh()

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200 and self.status != 101:
            self.informational.append(self.status)
            self.send_body_now = self.status == 100
        elif self.head_only or self.status in (101, 204, 304):
            self.head_done = True
            self.done.append(self._response(complete=True))

    def on_chunk_header(self) -> None:
        self.chunked = True

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        if self.status >= 200 and not self.head_done:
            self.done.append(self._response(complete=True))

    def _response(self, *, complete: bool) -> RawResponse:
        response = RawResponse(
            self.status, self.reason, self.headers, bytes(self.body),
            list(self.informational), self.chunked, complete,
        )  # fmt: skip
        self.informational = []
        return response

    def at_eof(self) -> RawResponse:
        if self.status < 200 or self.head_done:
            raise ConnectionError("connection closed before a response")
        framed = any(
            k.lower() in (b"content-length", b"transfer-encoding") for k, _ in self.headers
        )
        self.head_done = True
        return self._response(complete=not framed)  # close-delimited bodies end here


class ResponseReader:
    """Reads responses from one connection, one at a time, however they arrive.

    Several responses may come in one read (pipelining); they are queued, so
    each :meth:`next` returns exactly one.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter | None = None,
        *,
        head_only: bool = False,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._state = _Reader(head_only)

    async def next(self, *, body_after_continue: bytes | None = None) -> RawResponse:
        state = self._state
        while not state.done:
            data = await self._reader.read(65536)
            if not data:
                return state.at_eof()
            with contextlib.suppress(httptools.HttpParserUpgrade):  # a 101: the caller takes over
                state.parser.feed_data(data)
            if state.send_body_now and body_after_continue is not None and self._writer is not None:
                self._writer.write(body_after_continue)
                body_after_continue = None
            state.send_body_now = False
        return state.done.popleft()


async def request(
    host: str,
    port: int,
    raw: bytes,
    *,
    head_only: bool = False,
    within: float = 30.0,
    body_after_continue: bytes | None = None,
) -> RawResponse:
    """Send ``raw`` on a new connection and read one final response (1xx noted, skipped)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        async with asyncio.timeout(within):
            writer.write(raw)
            await writer.drain()
            responses = ResponseReader(reader, writer, head_only=head_only)
            return await responses.next(body_after_continue=body_after_continue)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
