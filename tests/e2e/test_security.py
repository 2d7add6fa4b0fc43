"""Security and hard limits against real processes (issue 4, docs/security.md).

Every bad input gets a clear answer, the bad connection or stream is closed,
and everything else keeps working with no state left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.client import ClientProtocol
from websockets.protocol import OPEN
from websockets.uri import parse_uri

from server.control import MAX_HANDSHAKES_PER_ADDRESS
from tests.e2e.conftest import ClientProcess, ExitServerProcess, Upstream
from tests.e2e.test_edge_corpus import BAD_HEADS, deliver
from tests.e2e.test_tunnel import fetch, lines_matching, server_status
from tests.support.rawhttp import ResponseReader, request
from tunnel.auth import token_digest
from tunnel.frames import Data, Hello, Open, encode
from tunnel.tls import aes_in_hardware, ensure_self_signed

Server = Callable[..., ExitServerProcess]
Client = Callable[..., ClientProcess]
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def command_line(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


# -- the public edge ------------------------------------------------------------------------------


async def test_the_edge_keeps_serving_after_a_storm_of_bad_requests(
    start_server: Server, start_client: Client, upstream: Upstream
) -> None:
    server = start_server()
    start_client(server, upstream.url)
    await asyncio.gather(*(deliver(server.port, raw, "whole") for raw, _ in BAD_HEADS.values()))
    response = await request("127.0.0.1", server.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (response.status, response.body) == (200, b"hello from upstream\n")


async def test_pipelined_requests_are_answered_in_order_with_a_bounded_queue(
    start_server: Server, start_client: Client, upstream: Upstream
) -> None:
    server = start_server()
    start_client(server, upstream.url)
    few = b"".join(b"GET /inspect/%d HTTP/1.1\r\nHost: a\r\n\r\n" % n for n in range(10))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(few)
    responses = ResponseReader(reader)
    paths = [json.loads((await responses.next()).body)["raw_path"] for _ in range(10)]
    assert paths == [f"/inspect/{n}" for n in range(10)]
    writer.close()
    flood = b"".join(b"GET /inspect/%d HTTP/1.1\r\nHost: a\r\n\r\n" % n for n in range(1000))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(flood)
    data = b""
    async with asyncio.timeout(20):
        while chunk := await reader.read(65536):
            data += chunk
    answered = data.count(b"HTTP/1.1 200 OK")
    assert 1 <= answered <= 40  # the first ones, in order, then the connection closes
    numbers = [int(n) for n in re.findall(rb'"raw_path": "/inspect/(\d+)"', data)]
    assert numbers == list(range(len(numbers)))
    writer.close()


async def test_incoming_forwarding_headers_are_replaced(
    start_server: Server, start_client: Client, upstream: Upstream
) -> None:
    server = start_server()
    start_client(server, upstream.url)
    raw = b"GET /inspect HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n\r\n"
    seen = {
        k.lower(): v
        for k, v in json.loads((await request("127.0.0.1", server.port, raw)).body)["headers"]
    }
    assert (seen["x-forwarded-for"], seen["x-forwarded-proto"], seen["x-forwarded-host"]) == (
        "127.0.0.1",
        "http",
        "a",
    )


# -- slow and greedy visitors ----------------------------------------------------------------------


async def test_slowloris_connections_get_408_while_a_normal_request_succeeds(
    start_server: Server, start_client: Client, upstream: Upstream
) -> None:
    server = start_server("--head-timeout", "2")
    start_client(server, upstream.url)
    slow = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(50)]
    started = time.monotonic()
    for n, (_, writer) in enumerate(slow):
        writer.write(b"GET /slowloris/%d HTTP/1.1\r\nHost: a\r\nX-Drip: " % n)
    for _ in range(3):
        for _, writer in slow:
            writer.write(b"a")
        response = await request("127.0.0.1", server.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert response.status == 200
        await asyncio.sleep(0.3)
    answers = await asyncio.gather(*(reader.read() for reader, _ in slow))
    elapsed = time.monotonic() - started
    assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers)
    assert 1.8 < elapsed < 6
    for _, writer in slow:
        writer.close()


async def test_a_stalled_body_is_closed_after_the_body_timeout(
    start_server: Server, start_client: Client, upstream: Upstream
) -> None:
    server = start_server("--body-timeout", "1")
    start_client(server, upstream.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /sha256 HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly ten b")
    started = time.monotonic()
    async with asyncio.timeout(5):
        answer = await reader.read()
    assert 0.9 < time.monotonic() - started < 4
    assert answer.startswith(b"HTTP/1.1 408 ")
    writer.close()
    logged = await server.process.wait_for_async(r'access: \S+ "POST /sha256"')
    assert " status=408 " in logged.string


async def test_a_visitor_that_stops_reading_is_dropped_after_the_send_timeout(
    start_server: Server, start_client: Client, upstream: Upstream, token: str
) -> None:
    """A slow read (R.U.D.Y.'s twin): it must not hold its connection, stream and upstream."""
    server = start_server("--send-timeout", "1")
    start_client(server, upstream.url)
    mark, upstream_mark = server.process.mark(), upstream.process.mark()
    visitor = socket.socket()
    visitor.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    visitor.connect(("127.0.0.1", server.port))
    visitor.sendall(b"GET /pattern/%d HTTP/1.1\r\nHost: a\r\n\r\n" % (500 * 1024 * 1024))
    started = time.monotonic()  # and never read
    await server.process.wait_for_async(
        r"a visitor from 127\.0\.0\.1 left its response unread for 1 s; dropped", since=mark
    )
    assert time.monotonic() - started < 8
    await upstream.process.wait_for_async(r"download aborted after \d+ bytes", since=upstream_mark)
    visitor.settimeout(10)
    taken = 0
    with contextlib.suppress(ConnectionResetError):
        while chunk := visitor.recv(1 << 20):
            taken += len(chunk)
    assert taken < 20 * 1024 * 1024  # the connection ended long before the response could
    visitor.close()

    async def released() -> bool:
        snapshot = await server_status(server, token)
        (client,) = snapshot["clients"]
        return snapshot["requests_in_flight"] == 0 and client["streams"] == client["idle_streams"]

    deadline = time.monotonic() + 10
    while not await released():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


async def test_an_idle_keep_alive_connection_is_closed(
    start_server: Server, start_client: Client, upstream: Upstream
) -> None:
    server = start_server("--keepalive-timeout", "1")
    start_client(server, upstream.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (await ResponseReader(reader).next()).status == 200
    started = time.monotonic()
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    assert 0.8 < time.monotonic() - started < 4
    writer.close()


async def fill_then_refused(port: int, count: int) -> tuple[list[Connection], bytes]:
    """Open ``count`` connections, then one more: those held, and what the extra one got."""
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]
    extra_reader, extra_writer = await asyncio.open_connection("127.0.0.1", port)
    async with asyncio.timeout(5):
        refused = await extra_reader.read()
    extra_writer.close()
    return held, refused


async def served_again(port: int, refused_status: int) -> None:
    """Ask on new connections until one is served: the exit server has seen a close."""
    deadline = time.monotonic() + 5
    while True:
        with contextlib.suppress(ConnectionError):  # a refusal may race our request
            answer = await request("127.0.0.1", port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            if answer.status == 200:
                return
            assert answer.status == refused_status
        assert time.monotonic() < deadline


async def test_connections_beyond_the_cap_get_503_and_the_rest_keep_working(
    start_server: Server, start_client: Client, upstream: Upstream
) -> None:
    server = start_server("--max-connections", "10")
    start_client(server, upstream.url)
    held, refused = await fill_then_refused(server.port, 10)
    assert refused.startswith(b"HTTP/1.1 503 ")
    assert refused.endswith(
        b"503 service unavailable: the exit server has too many open connections\n"
    )
    reader, writer = held[0]
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (await ResponseReader(reader).next()).status == 200
    for _, writer in held:
        writer.close()
    await served_again(server.port, 503)


async def test_one_address_beyond_its_share_of_connections_gets_429_and_others_are_served(
    start_server: Server, start_client: Client, upstream: Upstream, token: str
) -> None:
    server = start_server("--max-connections-per-address", "3")
    start_client(server, upstream.url)
    held, refused = await fill_then_refused(server.port, 3)
    assert refused.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    assert b"\r\nRetry-After: 5\r\n" in refused
    assert refused.endswith(b"429 too many open connections from your address\n")
    # Another address (all of 127/8 is loopback) is not held back by the first.
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", server.port, local_addr=("127.0.0.2", 0)
    )
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (await ResponseReader(reader).next()).status == 200
    writer.close()
    # The held connections are served, and one closed makes room for another.
    reader, writer = held.pop()
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (await ResponseReader(reader).next()).status == 200
    writer.close()
    await served_again(server.port, 429)
    status = await server_status(server, token)
    assert status["connections_refused"]["per_address"] >= 1
    assert status["connections_refused"]["max_connections"] == 0
    for _, writer in held:
        writer.close()


async def test_concurrent_requests_beyond_the_per_client_cap_get_503(
    start_server: Server, start_client: Client, upstream: Upstream
) -> None:
    server = start_server("--max-streams-per-client", "3")
    start_client(server, upstream.url)
    raw = b"GET /slow?seconds=1 HTTP/1.1\r\nHost: a\r\n\r\n"
    results = await asyncio.gather(*(request("127.0.0.1", server.port, raw) for _ in range(6)))
    statuses = sorted(r.status for r in results)
    assert statuses == [200, 200, 200, 503, 503, 503]


async def test_a_body_over_max_body_gets_413(
    start_server: Server, start_client: Client, upstream: Upstream
) -> None:
    server = start_server("--max-body", "1K")
    start_client(server, upstream.url)
    declared = await request(
        "127.0.0.1",
        server.port,
        b"POST /sha256 HTTP/1.1\r\nHost: a\r\nContent-Length: 2000\r\n\r\n",
    )
    assert declared.status == 413  # refused before a byte of the body was sent
    chunked = (
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"400\r\n"
        + b"x" * 1024
        + b"\r\n"
        + b"10\r\n"
        + b"y" * 16
        + b"\r\n0\r\n\r\n"
    )
    status, closed = await deliver(server.port, chunked, "whole")
    assert status in (413, None)
    assert closed
    logged = await server.process.wait_for_async(r'access: \S+ "POST /echo"')
    assert " status=413 " in logged.string, (
        logged.string
    )  # though the request had begun  # as answered, though the request had begun
    small = await request(
        "127.0.0.1",
        server.port,
        b"POST /sha256 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    )
    assert small.status == 200


async def test_a_path_allowlist_keeps_everything_else_off_the_client(
    start_server: Server, start_client: Client, upstream: Upstream
) -> None:
    server = start_server()
    start_client(
        server,
        upstream.url,
        flags=("--allow-path", "default=/inspect/", "--allow-path", "default=/echo"),
    )
    ok = await request(
        "127.0.0.1", server.port, b"GET /inspect/function HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert ok.status == 200
    for target in [
        b"/system/functions",
        b"/inspect/../system/functions",
        b"/inspect/..%2Fsystem/functions",
        b"/inspect/%2e%2e/system/functions",
        b"/inspect/%252e%252e/system",
        b"//system/functions",
        b"/%2Fsystem/functions",
        b"/inspect\\..\\system",
        b"/inspectx",
    ]:
        refused = await request(
            "127.0.0.1", server.port, b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % target
        )
        assert refused.status == 403, target
        assert refused.body == b"403 forbidden\n"


async def test_abandoned_connections_leave_nothing_behind(
    start_server: Server, start_client: Client, upstream: Upstream, token: str
) -> None:
    server = start_server("--max-connections-per-address", "0")  # all 300 from 127.0.0.1
    start_client(server, upstream.url)
    fds_before = open_fds(server.process.pid)
    sockets = []
    for n in range(300):
        conn = socket.create_connection(("127.0.0.1", server.port))
        conn.sendall(
            b"GET /slow?seconds=0.2 HTTP/1.1\r\nHost: a\r\n\r\n" if n % 2 else b"GET / HTT"
        )
        sockets.append(conn)
    for conn in sockets:
        conn.close()

    async def clean() -> bool:
        headers = {"Authorization": f"Bearer {token}"}
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{server.control_port}/status", headers=headers) as response,
        ):
            status = await response.json()
        (client,) = status["clients"]
        fds = open_fds(server.process.pid)
        return (
            status["visitor_connections"] == 0
            and status["visitor_addresses"] == 0  # every connection's count given back
            and status["requests_in_flight"] == 0
            and client["streams"] == client["idle_streams"]
            and fds <= fds_before + 2
        )

    deadline = time.monotonic() + 15
    while not await clean():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)


async def test_a_visitor_who_leaves_while_waiting_frees_the_stream_at_once(
    start_server: Server, start_client: Client, upstream: Upstream, token: str
) -> None:
    """A long poll and an SSE stream whose visitors close: nothing waits for the upstream.

    The upstream would answer the first in a minute and write the second's
    next event in a minute; the exit server must not hold either until then.
    """
    server = start_server()
    start_client(server, upstream.url)
    mark = server.process.mark()
    long_poll = socket.create_connection(("127.0.0.1", server.port))
    long_poll.sendall(b"GET /slow?seconds=60 HTTP/1.1\r\nHost: a\r\n\r\n")
    sse = socket.create_connection(("127.0.0.1", server.port))
    sse.sendall(b"GET /sse?n=2&interval=60 HTTP/1.1\r\nHost: a\r\n\r\n")
    sse.settimeout(10)
    received = b""
    while b"data: event 0" not in received:
        piece = sse.recv(65536)
        assert piece, received
        received += piece

    async def status() -> dict[str, object]:
        headers = {"Authorization": f"Bearer {token}"}
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{server.control_port}/status", headers=headers) as response,
        ):
            snapshot: dict[str, object] = await response.json()
            return snapshot

    deadline = time.monotonic() + 15
    while (await status())["requests_in_flight"] != 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    long_poll.close()
    sse.close()
    deadline = time.monotonic() + 5
    while True:
        snapshot = await status()
        (client,) = snapshot["clients"]  # type: ignore[misc]
        if snapshot["requests_in_flight"] == 0 and client["streams"] == client["idle_streams"]:
            break
        assert time.monotonic() < deadline, snapshot
        await asyncio.sleep(0.05)
    await server.process.wait_for_async(r"\"GET /slow\" .*status=499", since=mark)


async def test_visitors_dropping_thousands_of_requests_cost_the_tunnel_nothing(
    start_server: Server, start_client: Client, upstream: Upstream, token: str
) -> None:
    """More abandoned exchanges than the rapid-reset budget (2,000 in 10 s), in one window.

    Each visitor reads the head and first event of an SSE answer through the
    tunnel, so its request went out as DATA, and then drops its connection
    (RST): the exit server resets the stream for it. Browsers navigating away
    and clients timing out do this, and anyone can do it on purpose; the
    client's session, which serves everyone else, must not end over it
    (protocol.md §9). Until 2026-11-27 it did, with ENHANCE_YOUR_CALM.
    """
    server = start_server()
    client = start_client(server, upstream.url)
    mark = client.process.mark()
    budget, window_s = 2_000, 10.0
    dropped_at: list[float] = []

    async def drop_one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /sse?n=2&interval=60 HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"data: event 0"), 10)
        linger = struct.pack("ii", 1, 0)  # close with RST, as a killed browser tab does
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        writer.close()
        dropped_at.append(time.monotonic())

    def dense_enough() -> bool:
        recent = time.monotonic() - (window_s - 1)
        return sum(1 for at in dropped_at if at > recent) > budget

    deadline = time.monotonic() + 90
    while not dense_enough() and len(dropped_at) < 4 * budget and time.monotonic() < deadline:
        await asyncio.gather(*(drop_one() for _ in range(50)))
    assert dense_enough(), f"{len(dropped_at)} requests dropped, never {budget} in {window_s} s"

    await assert_the_session_kept_and_settled(server, client, token, mark)


async def test_thousands_of_websocket_visitors_leaving_every_way_leave_the_tunnel_whole(
    start_server: Server, start_client: Client, upstream: Upstream, token: str
) -> None:
    """Upgraded connections ended by a half-close, a close or a reset, fifty at a time.

    An upgraded connection is a byte pipe whose half-closes pass through both
    hops, and uvloop has aborted a plain relay that does this under such
    churn (bench/relay.py). Every visitor gets its 101 and its echo first.
    """
    server = start_server()
    client = start_client(server, upstream.url)
    mark = client.process.mark()
    handshake = (
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    hi = b"\x81\x82\x00\x00\x00\x00hi"  # a masked text frame (a zero mask) saying "hi"

    async def visit(way: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(handshake)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 "), head
        writer.write(hi)
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"\x81\x02hi"
        if way == 0:  # half-close, then read until the upstream has closed too
            writer.write_eof()
            await asyncio.wait_for(reader.read(), 10)
        elif way == 1:
            linger = struct.pack("ii", 1, 0)
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        writer.close()

    for batch in range(60):
        await asyncio.gather(*(visit((batch + n) % 3) for n in range(50)))

    await assert_the_session_kept_and_settled(server, client, token, mark)


async def assert_the_session_kept_and_settled(
    server: ExitServerProcess, client: ClientProcess, token: str, mark: int
) -> None:
    """The session that was up before is the one still up, and it serves; then all settles.

    Settled: no visitor connection, no request in flight, only pooled streams.
    """
    assert server.process.running()
    assert client.process.running()
    assert lines_matching(client, r"ENHANCE_YOUR_CALM|disconnected|connected to", mark) == 0
    status, body, _ = await fetch(f"{server.url}/")
    assert (status, body) == (200, b"hello from upstream\n")
    deadline = time.monotonic() + 15
    while True:
        snapshot = await server_status(server, token)
        (served,) = snapshot["clients"]
        if (
            snapshot["visitor_connections"] == 0
            and snapshot["requests_in_flight"] == 0
            and served["streams"] == served["idle_streams"]
        ):
            return
        assert time.monotonic() < deadline, snapshot
        await asyncio.sleep(0.2)


# -- the control channel: authentication ----------------------------------------------------------------


async def control(
    server: ExitServerProcess,
    path: str = "/connect",
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"http://127.0.0.1:{server.control_port}{path}", headers=headers or {}
        ) as response,
    ):
        return response.status, await response.text()


@pytest.mark.parametrize(
    "authorization",
    [
        [],
        ["Bearer wrong-token-of-some-length"],
        ["Basic dXNlcjpwYXNz"],
        ["Bearer"],
        ["{token}x"],
        ["Bearer {token}."],
        ["Bearer {short}"],
        ["Bearer {token}", "Bearer {token}"],
        ["Bearer wrong-token-of-some-length", "Bearer {token}"],
    ],
    ids=[
        "missing",
        "wrong",
        "basic",
        "empty bearer",
        "no scheme",
        "one extra character",
        "truncated",
        "the token twice",
        "a wrong token and the token",
    ],
)
async def test_a_missing_or_wrong_token_gets_401_before_the_upgrade(
    start_server: Server, token: str, authorization: list[str]
) -> None:
    server = start_server()
    headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Protocol", "homeport.v1"),
    ]
    headers += [("Authorization", a.format(token=token, short=token[:-3])) for a in authorization]
    status, body = await control(server, headers=headers)
    assert status == 401
    assert body == "unauthorized\n"
    await server.process.wait_for_async(
        r"rejected a client from 127\.0\.0\.1:\d+: (missing|wrong) token"
    )


@pytest.mark.parametrize("holds", ["token", "hash"])
async def test_a_token_in_the_url_is_refused_and_never_logged(
    start_server: Server, token: str, tmp_path: Path, holds: str
) -> None:
    auth = ()
    if holds == "hash":  # as deployed: no token to redact, so nothing may log the URL
        hash_file = tmp_path / "token.sha256"
        hash_file.write_text(token_digest(token).hex() + "\n")
        hash_file.chmod(0o600)
        auth = ("--token-hash-file", str(hash_file))
    server = start_server("--log-level", "debug", auth=auth or None)
    status, body = await control(server, f"/connect?token={token}")
    assert status == 400
    assert "header" in body
    for target in (f"/connect;token={token}", f"/connect%3Ftoken%3D{token}", f"/{token}"):
        assert (await control(server, target))[0] == 404
    # A request line without a query is logged; once it is read, so is all before it.
    await control(server, headers={"Authorization": f"Bearer {token}"})
    await server.process.wait_for_async(r"DEBUG +websockets\.server: < GET /connect HTTP/1\.1$")
    assert token not in server.process.output


async def test_a_client_of_another_protocol_version_gets_426_naming_ours(
    start_server: Server, token: str
) -> None:
    server = start_server()
    offered = "homeport.v9, <script>"
    status, body = await control(
        server,
        headers={
            "Authorization": f"Bearer {token}",
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Protocol": offered,
        },
    )
    assert status == 426
    assert "homeport.v1" in body
    assert "homeport.v9" not in body  # the request is never echoed
    assert "<script>" not in body


async def test_a_browser_origin_is_refused(start_server: Server, token: str) -> None:
    server = start_server()
    status, _ = await control(
        server, headers={"Origin": "https://evil.example", "Authorization": f"Bearer {token}"}
    )
    assert status == 403


async def test_repeated_failures_from_one_address_get_429_and_others_are_unaffected(
    start_server: Server, start_client: Client, upstream: Upstream, token: str
) -> None:
    server = start_server()
    for _ in range(5):
        assert (await control(server, headers={"Authorization": "Bearer nope-nope-nope-nope"}))[
            0
        ] == 401
    status, _ = await control(server, headers={"Authorization": f"Bearer {token}"})
    assert status == 429  # even the right token, from the attacker's address
    # A client from another address (127.0.0.2 is loopback too) is not affected.
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as http,
        http.get(
            f"http://127.0.0.1:{server.control_port}/status",
            headers={"Authorization": f"Bearer {token}"},
        ) as response,
    ):
        assert response.status == 200


async def test_the_server_can_hold_only_the_token_hash(
    start_server: Server, start_client: Client, upstream: Upstream, token: str, tmp_path: Path
) -> None:
    hash_file = tmp_path / "token.sha256"
    hash_file.write_text(token_digest(token).hex() + "\n")
    hash_file.chmod(0o600)
    server = start_server(auth=("--token-hash-file", str(hash_file)))
    start_client(server, upstream.url)
    assert (
        await request("127.0.0.1", server.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    ).status == 200
    assert token_digest(token).hex() not in server.process.output


async def test_no_service_has_the_token_in_its_argv(
    tunnel: tuple[ExitServerProcess, ClientProcess], token: str
) -> None:
    server, client = tunnel
    for process in (server.process, client.process):
        assert token.encode() not in command_line(process.pid)


# -- the control channel: TLS --------------------------------------------------------------------------


FINGERPRINT = r"control channel TLS certificate fingerprint: (sha256:[0-9a-f]{64})$"


async def test_auto_tls_prints_a_fingerprint_that_the_client_pins(
    start_server: Server, start_client: Client, upstream: Upstream, tmp_path: Path
) -> None:
    data = tmp_path / "state"
    server = start_server("--auto-tls", "--auto-tls-san", "127.0.0.1", "--data-dir", str(data))
    fingerprint = server.process.wait_for(FINGERPRINT).group(1)
    command = server.process.wait_for(
        r"on the client, run: (homeport client --url wss://127\.0\.0\.1:\d+ .*)$"
    ).group(1)
    assert f"--fingerprint {fingerprint}" in command
    url = f"wss://127.0.0.1:{server.control_port}"
    client = start_client(server, upstream.url, url=url, flags=("--fingerprint", fingerprint))
    # The client says which TLS it got: this CPU's cipher (tunnel.tls, ChaCha20 without AES).
    cipher = "TLS_AES_256_GCM_SHA384" if aes_in_hardware() else "TLS_CHACHA20_POLY1305_SHA256"
    assert re.search(
        rf"connected to wss://\S+ as \S+ \(session \w+\) over TLSv1\.3 with {cipher}; serving",
        client.process.output,
    )
    response = await request("127.0.0.1", server.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert response.status == 200
    # A restart keeps the same certificate, so the pin still holds.
    server.process.stop()
    again = start_server(
        "--auto-tls", "--data-dir", str(data), port=server.port, control_port=server.control_port
    )
    assert again.process.wait_for(FINGERPRINT).group(1) == fingerprint


async def test_a_wrong_pin_is_refused_before_the_token_is_sent(
    start_server: Server, start_client: Client, upstream: Upstream, tmp_path: Path
) -> None:
    server = start_server("--auto-tls", "--data-dir", str(tmp_path / "state"))
    url = f"wss://127.0.0.1:{server.control_port}"
    client = start_client(
        server, upstream.url, url=url, flags=("--fingerprint", "sha256:" + "ab" * 32), wait=False
    )
    await client.process.wait_for_async(
        r"is not the pinned sha256:(ab){32}; refusing to send the token"
    )
    assert "rejected a client" not in server.process.output  # no HTTP request ever reached it
    assert "connected to" not in client.process.output


async def test_ca_file_trusts_the_certificate_and_system_cas_do_not(
    start_server: Server, start_client: Client, upstream: Upstream, tmp_path: Path
) -> None:
    data = tmp_path / "state"
    server = start_server("--auto-tls", "--auto-tls-san", "127.0.0.1", "--data-dir", str(data))
    url = f"wss://127.0.0.1:{server.control_port}"
    start_client(server, upstream.url, url=url, flags=("--ca-file", str(data / "tls.crt")))
    plain = start_client(server, upstream.url, url=url, name="plain", wait=False)
    await plain.process.wait_for_async(
        r"TLS certificate rejected: self-signed certificate; pin it with --fingerprint"
    )


async def test_a_real_certificate_can_be_given_with_tls_cert_and_tls_key(
    start_server: Server, start_client: Client, upstream: Upstream, tmp_path: Path
) -> None:
    made = ensure_self_signed(tmp_path / "pki", ["127.0.0.1"])
    server = start_server("--tls-cert", str(made.cert_path), "--tls-key", str(made.key_path))
    url = f"wss://127.0.0.1:{server.control_port}"
    start_client(server, upstream.url, url=url, flags=("--ca-file", str(made.cert_path)))
    assert (
        await request("127.0.0.1", server.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    ).status == 200


# -- the control channel: handshake and session limits ------------------------------------------------


async def test_a_flood_of_silent_control_connections_holds_only_its_share(
    start_server: Server, start_client: Client, upstream: Upstream, token: str
) -> None:
    """Connections that never finish their handshake hold at most a few slots of one address.

    Unbounded, 5,000 of them took the exit server from 28 to 289 MiB over
    TLS, each holding a socket and its TLS state until its deadline
    (server/control.py; tests/server/test_control_admission.py covers TLS).
    """
    server = start_server()

    async def status_until(condition: Callable[[dict], bool]) -> dict:
        deadline = time.monotonic() + 10
        while not condition(current := await server_status(server, token)):
            assert time.monotonic() < deadline, current
        return current

    flood = [
        await asyncio.open_connection("127.0.0.1", server.control_port, local_addr=("127.0.0.3", 0))
        for _ in range(MAX_HANDSHAKES_PER_ADDRESS + 40)
    ]
    seen = await status_until(lambda s: s["control_connections_refused"]["per_address"] == 40)
    # The flood's share, and the request asking for the status, in its own handshake.
    assert seen["control_handshakes"] == MAX_HANDSHAKES_PER_ADDRESS + 1
    # A client from elsewhere connects and is served all the while.
    start_client(server, upstream.url)
    response = await request("127.0.0.1", server.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert response.status == 200
    for _, writer in flood:
        writer.close()
    await status_until(lambda s: s["control_handshakes"] == 1)


@pytest.mark.timeout(60)
async def test_handshakes_that_never_complete_are_closed_at_10_s(
    start_server: Server, tmp_path: Path
) -> None:
    plain = start_server()
    tls = start_server("--auto-tls", "--data-dir", str(tmp_path / "state"))
    started = time.monotonic()

    async def stalled(port: int, opening: bytes) -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(opening)
        async with asyncio.timeout(20):
            await reader.read()
        writer.close()
        return time.monotonic() - started

    times = await asyncio.gather(
        stalled(
            plain.control_port, b"GET /connect HTTP/1.1\r\nHost: a\r\n"
        ),  # an HTTP head never finished
        stalled(tls.control_port, b""),  # a TLS handshake never started
    )
    assert all(9 < elapsed < 15 for elapsed in times), times


def client_hello(name: str = "rogue", **extra: object) -> bytes:
    return encode(Hello({
        "version": 1, "initial_window_bytes": 262144, "max_frame_bytes": 65536,
        "max_concurrent_streams": 100, "client_name": name, "routes": [{"host": f"{name}.example"}],
        **extra,
    }))  # fmt: skip


@contextlib.asynccontextmanager
async def rogue(
    server: ExitServerProcess, token: str, *, hello: bytes | None = None
) -> AsyncIterator[ClientConnection]:
    async with ws_connect(
        f"ws://127.0.0.1:{server.control_port}/connect",
        additional_headers={"Authorization": f"Bearer {token}"},
        subprotocols=[websockets.Subprotocol("homeport.v1")],
        compression=None,
        max_size=None,
        ping_interval=None,
    ) as ws:
        if hello is not None:
            await ws.send(hello)
            await asyncio.wait_for(ws.recv(), 5)  # the server's HELLO
        yield ws


async def test_compression_offered_by_a_client_is_never_negotiated(
    start_server: Server, token: str
) -> None:
    server = start_server()
    async with ws_connect(
        f"ws://127.0.0.1:{server.control_port}/connect",
        additional_headers={"Authorization": f"Bearer {token}"},
        subprotocols=[websockets.Subprotocol("homeport.v1")],
        compression="deflate",
        ping_interval=None,
    ) as ws:
        assert ws.request is not None
        assert ws.response is not None
        assert "permessage-deflate" in ws.request.headers["Sec-WebSocket-Extensions"]
        assert "Sec-WebSocket-Extensions" not in ws.response.headers


async def drain_until_closed(ws: ClientConnection) -> None:
    """Read until the server closes the connection (bounded)."""
    async with asyncio.timeout(5):
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                await ws.recv()


ROGUE_MESSAGES = {
    # Its length field is read first: far beyond the limit, so FRAME_SIZE_ERROR.
    "garbage bytes": (client_hello(), b"\xde\xad\xbe\xef" * 4, 1009),
    "a truncated frame": (client_hello(), bytes.fromhex("0000000000010000"), 1009),
    "an unknown frame type": (client_hello(), bytes.fromhex("7f00000000010000000000"), 1002),
    "DATA for a stream never opened": (client_hello(), encode(Data(2, b"forged")), 1002),
    "a client opening a stream": (client_hello(), encode(Open(1, "")), 1002),
    "a text message": (client_hello(), "text, not binary", 1003),
    "an oversized message": (client_hello(), b"\x00" * (3 * 1024 * 1024), 1009),
    "no HELLO first": (None, encode(Data(1, b"x")), 1002),
    "a HELLO with a bad name": (None, client_hello("bad name!"), 1002),
    "a connection number beyond its count": (None, client_hello(connection=2, connections=2), 1002),
    "too many connections": (None, client_hello(connection=0, connections=9), 1002),
    "a connection count that is no integer": (None, client_hello(connections="2"), 1002),
    "an instance that is no hex": (None, client_hello(instance="not hex!"), 1002),
    "a PROXY protocol for a port not served": (
        None,
        client_hello(tcp_ports=[2222], proxy_protocol={"2223": 1}),
        1002,
    ),
    "a PROXY protocol version 3": (
        None,
        client_hello(tcp_ports=[2222], proxy_protocol={"2222": 3}),
        1002,
    ),
    "a PROXY protocol version true": (
        None,
        client_hello(tcp_ports=[2222], proxy_protocol={"2222": True}),
        1002,
    ),
    "a PROXY protocol port of 5,000 digits": (
        None,
        client_hello(tcp_ports=[2222], proxy_protocol={"9" * 5000: 1}),
        1002,
    ),
    "a PROXY protocol that is a list": (
        None,
        client_hello(tcp_ports=[2222], proxy_protocol=[2222]),
        1002,
    ),
}


@pytest.mark.parametrize("case", ROGUE_MESSAGES.keys())
async def test_a_rogue_client_loses_its_session_and_others_keep_working(
    tunnel: tuple[ExitServerProcess, ClientProcess], token: str, case: str
) -> None:
    server, _ = tunnel
    hello, message, code = ROGUE_MESSAGES[case]
    async with rogue(server, token, hello=hello) as ws:
        await ws.send(message)
        await drain_until_closed(ws)
        assert ws.close_code == code
    response = await request("127.0.0.1", server.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (response.status, response.body) == (200, b"hello from upstream\n")


async def test_a_new_session_with_the_same_name_replaces_the_ghost(
    tunnel: tuple[ExitServerProcess, ClientProcess], upstream: Upstream, token: str
) -> None:
    server, client = tunnel
    mark, upstream_mark = client.process.mark(), upstream.process.mark()
    in_flight = asyncio.create_task(fetch(f"{server.url}/slow?seconds=60"))
    await upstream.process.wait_for_async(r"answering in 60", since=upstream_mark)
    async with rogue(server, token, hello=client_hello("pi")):
        await client.process.wait_for_async(
            r"replaced this session with a newer one named pi", since=mark
        )
        await server.process.wait_for_async(
            r"client pi reconnected from .*closing its previous session"
        )
        status, _, _ = await asyncio.wait_for(in_flight, 10)
        assert status == 502  # its session is gone; the newer one never saw the request
    await asyncio.to_thread(
        client.wait_connected, 15.0, mark
    )  # and it comes back when the other leaves


async def test_a_hello_arriving_with_the_upgrade_request_is_not_lost(
    start_server: Server, token: str
) -> None:
    """The HELLO may reach the server before its session exists; it must wait, not vanish."""
    server = start_server()
    protocol = ClientProtocol(
        parse_uri(f"ws://127.0.0.1:{server.control_port}/connect"),
        subprotocols=[websockets.Subprotocol("homeport.v1")],
    )
    request = protocol.connect()
    request.headers["Authorization"] = f"Bearer {token}"
    protocol.send_request(request)
    protocol.state = OPEN  # only so that websockets frames (and masks) the HELLO for us
    protocol.send_binary(client_hello("early"))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.control_port)
    writer.write(b"".join(protocol.data_to_send()))  # the request and the HELLO in one write
    received = b""
    async with asyncio.timeout(5):
        while b"session_id" not in received:
            chunk = await reader.read(65536)
            assert chunk, "the server closed without answering the HELLO"
            received += chunk
    writer.close()
