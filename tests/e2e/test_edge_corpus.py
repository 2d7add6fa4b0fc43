"""The public edge against a corpus of bad requests, each delivered three ways (issue 4).

Whole, byte by byte, and in random pieces: the answer must not depend on how
the bytes were split, the connection must close, and nothing may reach the
upstream (a body-level error may let the request head through, never the bad
bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.e2e.conftest import CONNECTED, READY, Processes
from tests.support.processes import homeport
from tests.support.rawupstream import RawUpstream
from tunnel.auth import generate_token, write_secret_file

pytestmark = pytest.mark.asyncio(loop_scope="module")

BAD_HEADS: dict[str, tuple[bytes, int]] = {
    "Content-Length with Transfer-Encoding": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "duplicate Content-Length, same value": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
        400,
    ),
    "duplicate Content-Length, other value": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        400,
    ),
    "Content-Length with a sign": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\nabcd",
        400,
    ),
    "Content-Length in hex": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x4\r\n\r\nabcd",
        400,
    ),
    "empty Content-Length": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n", 400),
    "Transfer-Encoding xchunked": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "Transfer-Encoding chunked then gzip": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        400,
    ),
    "Transfer-Encoding gzip then chunked": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "Transfer-Encoding with a trailing space": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked \r\n\r\n0\r\n\r\n",
        400,
    ),
    "Transfer-Encoding with a trailing comma": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked,\r\n\r\n0\r\n\r\n",
        400,
    ),
    "two Transfer-Encodings": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "chunked on HTTP/1.0": (
        b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
        400,
    ),
    "bare LF line endings": (b"GET / HTTP/1.1\nHost: a\n\n", 400),
    "obs-fold continuation": (b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n", 400),
    "space before the colon": (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    "NUL in a header value": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    "CR in a header value": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
    "0xFF in a header name": (b"GET / HTTP/1.1\r\nHost: a\r\nX\xff: b\r\n\r\n", 400),
    "empty header name": (b"GET / HTTP/1.1\r\nHost: a\r\n: b\r\n\r\n", 400),
    "no Host on HTTP/1.1": (b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", 400),
    "two Host headers": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "a Host that is no host name": (b"GET / HTTP/1.1\r\nHost: a b/c\r\n\r\n", 400),
    "CONNECT": (b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", 405),
    "absolute-form target": (
        b"GET http://10.0.0.1:8080/system/functions HTTP/1.1\r\nHost: a\r\n\r\n",
        400,
    ),
    "HTTP/2.0 request line": (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    "the HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    "HTTP/0.9": (b"GET /\r\n\r\n", 400),
    "HTTP/1.32": (b"GET / HTTP/1.32\r\nHost: a\r\n\r\n", 400),
    "a TLS ClientHello": (bytes.fromhex("16030100c8010000c40303") + bytes(200), 400),
    "an h2c upgrade": (
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
        400,
    ),
    "an unknown expectation": (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\n\r\n", 417),
    "request line over 8190 bytes": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    "one header over 8190 bytes": (
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n",
        431,
    ),
    "more than 100 headers": (
        b"GET / HTTP/1.1\r\nHost: a\r\n"
        + b"".join(b"X-%d: v\r\n" % n for n in range(150))
        + b"\r\n",
        431,
    ),
    "a head over 32 KiB in small headers": (
        b"GET / HTTP/1.1\r\nHost: a\r\n"
        + b"".join(b"X-%02d: %s\r\n" % (n, b"v" * 500) for n in range(80))
        + b"\r\n",
        431,
    ),
    "a header over 40 KiB": (
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Huge: " + b"h" * 41_000 + b"\r\n\r\n",
        431,
    ),
    # Never finished: llhttp holds the pieces, and the edge must count them
    # from the first read on, or only a split delivery would be refused.
    "an unfinished header over 40 KiB": (
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Huge: " + b"h" * 45_000,
        431,
    ),
}

BAD_BODIES: dict[str, bytes] = {
    "chunk size with an underscore": b"0_2e\r\n",
    "chunk size with a bare LF": b"4\nabcd\r\n0\r\n\r\n",
    "LF inside a chunk extension": b"4;ext=a\nb\r\nabcd\r\n0\r\n\r\n",
    "chunk size of 20 hex digits": b"ffffffffffffffffffff\r\n",
    "negative chunk size": b"-4\r\nabcd\r\n",
}


async def deliver(port: int, raw: bytes, how: str) -> tuple[int | None, bool]:
    """Send ``raw`` whole, byte by byte or in random pieces; return (status, closed after)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if how == "whole":
            pieces = [raw]
        elif how == "bytewise":
            pieces = [raw[i : i + 1] for i in range(len(raw))]
        else:
            rng = random.Random(len(raw))
            cuts = sorted(rng.sample(range(1, len(raw)), min(12, len(raw) - 1)))
            pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        with contextlib.suppress(ConnectionError):
            for piece in pieces:
                writer.write(piece)
                if how != "whole":
                    await writer.drain()
        data = b""
        async with asyncio.timeout(15):
            while chunk := await reader.read(65536):
                data += chunk
        match = re.match(rb"HTTP/1\.1 (\d{3}) ", data)
        return (int(match.group(1)) if match else None), True
    except ConnectionResetError:
        return None, True
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def edge(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[int, RawUpstream]]:
    """One exit server for the module, whose only upstream records every byte that reaches it."""
    upstream = RawUpstream(answer=b"", close_after=False)
    token_file = tmp_path_factory.mktemp("edge") / "token"
    write_secret_file(token_file, generate_token())
    processes = Processes()
    async with await upstream.start():
        try:
            server = processes.start(
                "server",
                homeport("server", "--bind", "127.0.0.1", "--port", "0", "--control-port", "0",
                         "--token-file", str(token_file)),
            )  # fmt: skip
            ready = server.wait_for(READY)
            client = processes.start(
                "client",
                homeport("client", "--url", f"ws://127.0.0.1:{ready.group(2)}",
                         "--token-file", str(token_file), "--upstream", upstream.url),
            )  # fmt: skip
            client.wait_for(CONNECTED)
            yield int(ready.group(1)), upstream
        finally:
            processes.stop_all()


@pytest.mark.parametrize("how", ["whole", "bytewise", "random"])
@pytest.mark.parametrize("case", BAD_HEADS.keys())
async def test_a_bad_request_head_is_refused_and_nothing_is_forwarded(
    edge: tuple[int, RawUpstream], case: str, how: str
) -> None:
    port, upstream = edge
    raw, expected = BAD_HEADS[case]
    connections = upstream.connections
    status, closed = await deliver(port, raw, how)
    assert status == expected
    assert closed
    assert upstream.connections == connections


@pytest.mark.parametrize("how", ["whole", "bytewise", "random"])
@pytest.mark.parametrize("case", BAD_BODIES.keys())
async def test_a_malformed_chunked_body_closes_and_never_reaches_the_upstream(
    edge: tuple[int, RawUpstream], case: str, how: str
) -> None:
    port, upstream = edge
    body = BAD_BODIES[case]
    raw = b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    status, closed = await deliver(port, raw, how)
    assert status in (400, None)
    assert closed
    assert body not in upstream.received
    assert b"abcd" not in upstream.received
