"""HTTP through the tunnel beyond single requests: streaming, WebSockets, errors, routing (issue 3)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import socket
import statistics
import time
from collections.abc import Callable

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect

from tests.e2e.conftest import ClientProcess, ExitServerProcess, Upstream
from tests.support.rawhttp import ResponseReader, request
from tests.support.rawupstream import RawUpstream
from tests.support.upstream import pattern_body
from tunnel.mux import DEFAULT_WINDOW_BYTES

MIB = 1024 * 1024
Tunnel = tuple[ExitServerProcess, ClientProcess]


def raw_get(path: str, host: str = "app.example") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


async def status_of(server: ExitServerProcess, token: str) -> dict:
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"http://127.0.0.1:{server.control_port}/status",
            headers={"Authorization": f"Bearer {token}"},
        ) as response,
    ):
        return await response.json()  # type: ignore[no-any-return]


# -- streaming ---------------------------------------------------------------------------


async def test_server_sent_events_arrive_one_by_one(tunnel: Tunnel) -> None:
    server, _ = tunnel
    started = time.monotonic()
    arrivals: list[float] = []
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{server.url}/sse?n=5&interval=0.5") as response,
    ):
        assert response.headers["Content-Type"] == "text/event-stream"
        buffer = b""
        async for chunk in response.content.iter_any():
            buffer += chunk
            while b"\n\n" in buffer:
                _, buffer = buffer.split(b"\n\n", 1)
                arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 5
    assert arrivals[0] < 1.0  # the first event long before the stream ends (~2.5 s)
    assert arrivals[-1] - arrivals[0] > 1.5  # and they came spread out, not in one batch


async def test_a_chunked_response_flows_as_it_is_written(tunnel: Tunnel) -> None:
    server, _ = tunnel
    started = time.monotonic()
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{server.url}/chunked?n=4&interval=0.5") as response,
    ):
        first = await response.content.readline()
        first_at = time.monotonic() - started
        rest = await response.read()
    assert first == b"piece 0\n"
    assert first_at < 1.0
    assert rest == b"piece 1\npiece 2\npiece 3\n"


async def test_a_long_poll_is_answered_when_the_upstream_is_ready(tunnel: Tunnel) -> None:
    server, _ = tunnel
    response = await request("127.0.0.1", server.port, raw_get("/slow?seconds=3"))
    assert (response.status, response.body) == (200, b"slow but done\n")


@pytest.mark.timeout(180)
async def test_a_one_gib_upload_streams_with_bounded_memory(tunnel: Tunnel) -> None:
    server, client = tunnel
    size = 1024 * MIB
    baseline = {"server": server.process.rss_bytes(), "client": client.process.rss_bytes()}
    peak = dict(baseline)

    async def body():  # type: ignore[no-untyped-def]
        for n in range(size // MIB):
            yield pattern_body(MIB)
            if n % 64 == 0:
                peak["server"] = max(peak["server"], server.process.rss_bytes())
                peak["client"] = max(peak["client"], client.process.rss_bytes())

    digest = hashlib.sha256()
    one = pattern_body(MIB)
    for _ in range(size // MIB):
        digest.update(one)
    timeout = aiohttp.ClientTimeout(total=150)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.post(f"{server.url}/sha256", data=body()) as response,
    ):
        result = await response.json()
    assert result == {"sha256": digest.hexdigest(), "size": size}
    for side in ("server", "client"):
        assert peak[side] - baseline[side] < 48 * MIB, (
            f"{side} grew by {(peak[side] - baseline[side]) / MIB:.0f} MiB"
        )


# -- WebSockets ----------------------------------------------------------------------------


async def test_a_websocket_passes_through_with_its_subprotocol_messages_and_pings(
    tunnel: Tunnel,
) -> None:
    server, _ = tunnel
    url = f"ws://127.0.0.1:{server.port}/ws"
    async with ws_connect(
        url, subprotocols=["superchat"], max_size=8 * MIB, compression=None
    ) as ws:
        assert ws.subprotocol == "superchat"
        await ws.send("hello ☃")
        assert await ws.recv() == "hello ☃"
        await ws.send(b"\x00\x01\xfe\xff")
        assert await ws.recv() == b"\x00\x01\xfe\xff"
        big = pattern_body(MIB)
        await ws.send(big)
        assert await ws.recv() == big
        latency = await asyncio.wait_for(await ws.ping(), timeout=5)
        assert latency is None or latency >= 0
        for n in range(100):
            await ws.send(f"message {n}")
        assert [await ws.recv() for _ in range(100)] == [f"message {n}" for n in range(100)]


async def test_a_websocket_close_code_and_reason_from_the_upstream_reach_the_visitor(
    tunnel: Tunnel,
) -> None:
    server, _ = tunnel
    async with ws_connect(f"ws://127.0.0.1:{server.port}/ws", compression=None) as ws:
        await ws.send("close:4001:upstream says bye")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "upstream says bye")


async def test_a_websocket_close_from_the_visitor_reaches_the_upstream(
    tunnel: Tunnel, upstream: Upstream
) -> None:
    server, _ = tunnel
    mark = upstream.process.mark()
    async with ws_connect(f"ws://127.0.0.1:{server.port}/ws", compression=None) as ws:
        await ws.send("hi")
        await ws.recv()
        await ws.close(4002, "visitor leaves")
    await upstream.process.wait_for_async(r"websocket closed with 4002", since=mark)


async def test_a_websocket_idle_for_the_idle_timeout_is_closed_and_busy_ones_are_not(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    upstream: Upstream,
) -> None:
    server = start_server("--websocket-idle-timeout", "2")
    start_client(server, upstream.url)
    url = f"ws://127.0.0.1:{server.port}/ws"
    mark = upstream.process.mark()
    async with (
        ws_connect(url, compression=None, ping_interval=None) as idle,
        ws_connect(url, compression=None, ping_interval=None) as talking,
        ws_connect(url, compression=None, ping_interval=None) as listening,
    ):
        await idle.send("one message, then nothing")
        assert await idle.recv() == "one message, then nothing"
        quiet_since = time.monotonic()
        closed = asyncio.ensure_future(idle.wait_closed())
        closed_after: list[float] = []
        closed.add_done_callback(lambda _: closed_after.append(time.monotonic() - quiet_since))
        # For two idle timeouts, bytes cross the other two one way only: the
        # visitor talks to an upstream that does not answer, and an upstream
        # talks to a visitor that says nothing.
        await talking.send("mute")
        await listening.send("ticks:16:0.25")
        for n in range(16):
            await talking.send(f"talk {n}")
            assert await asyncio.wait_for(listening.recv(), timeout=5) == f"tick {n}"
        await asyncio.wait_for(closed, timeout=10)
        assert closed_after[0] >= 1.9  # not before its two seconds of silence
        assert idle.close_code == 1006  # the TCP connection closed under it
        # Its upstream connection was dropped too, while the others go on.
        await upstream.process.wait_for_async(r"websocket closed with", since=mark)
        for ws in (talking, listening):
            await ws.send("unmute")
            await ws.send("still here")
            assert await asyncio.wait_for(ws.recv(), timeout=5) == "still here"
    await server.process.wait_for_async(r"carried nothing for 2 s; closed")


async def test_websocket_pass_through_can_be_turned_off(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    upstream: Upstream,
) -> None:
    server = start_server("--no-websocket")
    start_client(server, upstream.url)
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with ws_connect(f"ws://127.0.0.1:{server.port}/ws"):
            pass
    assert refused.value.response.status_code == 400
    assert (await request("127.0.0.1", server.port, raw_get("/"))).status == 200


async def test_a_non_websocket_upgrade_is_refused(tunnel: Tunnel) -> None:
    server, _ = tunnel
    raw = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
    assert (await request("127.0.0.1", server.port, raw)).status == 400


# -- errors as a proxy gives them -------------------------------------------------------------


async def test_an_upstream_slower_than_the_response_timeout_gives_504(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    upstream: Upstream,
) -> None:
    server = start_server("--response-timeout", "1")
    start_client(server, upstream.url)
    started = time.monotonic()
    response = await request("127.0.0.1", server.port, raw_get("/slow?seconds=5"))
    elapsed = time.monotonic() - started
    assert response.status == 504
    assert 0.9 < elapsed < 4
    assert response.body == b"504 gateway timeout: the upstream did not answer in time\n"
    # the tunnel is fine afterwards
    assert (await request("127.0.0.1", server.port, raw_get("/"))).status == 200


async def test_a_visitor_leaving_mid_download_aborts_the_upstream_request(
    tunnel: Tunnel, upstream: Upstream, token: str
) -> None:
    server, _ = tunnel
    mark = upstream.process.mark()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(raw_get(f"/pattern/{500 * MIB}"))
    await reader.readexactly(4 * MIB)
    writer.transport.abort()
    match = await upstream.process.wait_for_async(r"download aborted after (\d+) bytes", since=mark)
    assert int(match.group(1)) < 100 * MIB

    async def nothing_left() -> bool:
        (client,) = (await status_of(server, token))["clients"]
        return client["streams"] == client["idle_streams"] and client["held_bytes"] == 0

    deadline = time.monotonic() + 10
    while not await nothing_left():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


async def test_an_answer_before_the_upload_ends_reaches_the_visitor_and_frees_everything(
    tunnel: Tunnel, upstream: Upstream, token: str
) -> None:
    """As faasd's 401 to an unauthenticated POST: the upstream answers without reading the body.

    The visitor gets the answer, then the connection ends (the rest of its
    body has nowhere to go); the stream is reset, nothing is held, and the
    next visitor is served.
    """
    server, _ = tunnel
    mark = server.process.mark()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /status/401 HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (64 * MIB))
    answer = asyncio.ensure_future(ResponseReader(reader).next())
    sent = 0
    with contextlib.suppress(ConnectionError):
        while not answer.done() and sent < 64 * MIB:  # bounded: the declared length
            writer.write(b"x" * (256 * 1024))
            sent += 256 * 1024
            await writer.drain()
            # drain() does not yield while the socket takes the bytes: let the
            # reader take the answer now. Once the exit server stops lingering
            # (1 MiB) a failed write would set an error on the reader, which
            # asyncio raises before the answer it had buffered.
            await asyncio.sleep(0)
    response = await asyncio.wait_for(answer, 10)
    assert response.status == 401
    assert response.body == b"status 401\n"
    assert sent < 64 * MIB  # answered while the body was still coming
    async with asyncio.timeout(10):  # then the connection ends: nothing more is read
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(b"x" * (256 * 1024))
                await writer.drain()
    writer.transport.abort()
    await server.process.wait_for_async(r"\"POST /status/401\" .*status=401", since=mark)

    async def nothing_left() -> bool:
        snapshot = await status_of(server, token)
        (client,) = snapshot["clients"]
        return (
            snapshot["requests_in_flight"] == 0
            and client["streams"] == client["idle_streams"]
            and client["held_bytes"] == 0
        )

    deadline = time.monotonic() + 10
    while not await nothing_left():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert (await request("127.0.0.1", server.port, raw_get("/"))).status == 200


MALFORMED = {
    "status out of range": b"HTTP/1.1 999 Nope\r\nContent-Length: 0\r\n\r\n",
    "status below 100": b"HTTP/1.1 042 Nope\r\nContent-Length: 0\r\n\r\n",
    "CR inside a header": b"HTTP/1.1 200 OK\r\nX-Evil: a\rInjected: b\r\nContent-Length: 0\r\n\r\n",
    "LF inside a header": b"HTTP/1.1 200 OK\r\nX-Evil: a\nInjected: b\r\nContent-Length: 0\r\n\r\n",
    "Content-Length with Transfer-Encoding": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two Content-Lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "a transfer coding we cannot pass": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "not HTTP at all": b"SSH-2.0-OpenSSH_9.2\r\n",
    "closed before any answer": b"",
    "a 101 nobody asked for": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    "more than 256 headers": b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"X-Evil-%d: a\r\n" % n for n in range(257))
    + b"Content-Length: 0\r\n\r\n",
    "a head over 64 KiB": b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"X-Evil-%d: %s\r\n" % (n, b"a" * 4000) for n in range(17))
    + b"Content-Length: 0\r\n\r\n",
}


@pytest.mark.parametrize("answer", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_upstream_response_becomes_502_and_is_never_passed_on(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    answer: bytes,
) -> None:
    upstream = RawUpstream(answer)
    listener = await upstream.start()
    async with listener:
        server = start_server()
        start_client(server, f"http://127.0.0.1:{upstream.port}")
        response = await request("127.0.0.1", server.port, raw_get("/"))
        assert response.status == 502
        assert response.body == b"502 bad gateway: the upstream did not answer properly\n"
        assert not any(b"Injected" in name or b"Evil" in name for name, _ in response.headers)


async def test_hop_by_hop_headers_of_a_response_are_not_passed_on(
    start_server: Callable[..., ExitServerProcess], start_client: Callable[..., ClientProcess]
) -> None:
    upstream = RawUpstream(
        b"HTTP/1.1 200 OK\r\n"
        b"Connection: keep-alive, X-Hop\r\n"
        b"X-Hop: for the proxy only\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-T\r\n"
        b"Upgrade: h2c\r\n"
        b"X-Kept: yes\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    async with await upstream.start():
        server = start_server()
        start_client(server, f"http://127.0.0.1:{upstream.port}")
        response = await request("127.0.0.1", server.port, raw_get("/"))
    assert (response.status, response.body) == (200, b"ok")
    assert response.header("X-Kept") == b"yes"
    names = {name.lower() for name, _ in response.headers}
    for hop in (b"x-hop", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"):
        assert hop not in names
    assert b"x-hop" not in (response.header("Connection") or b"").lower()


EXTRA_AFTER_RESPONSE = {
    "a second response": b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\nevil",
    "bytes that are no response": b"evil bytes\r\n\r\n",
}


# A body of 1 MiB reaches the exit server in several stream messages (at most
# 256 KiB each): its end and the extra bytes come after llhttp read the head.
BODIES = {"a short body": b"ok", "a body of 1 MiB": bytes(range(256)) * 4096}


# llhttp refuses any byte after a complete response that said Connection: close.
CONNECTION = {"kept alive": b"", "Connection: close": b"Connection: close\r\n"}


@pytest.mark.parametrize("connection", CONNECTION.values(), ids=CONNECTION.keys())
@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
@pytest.mark.parametrize("extra", EXTRA_AFTER_RESPONSE.values(), ids=EXTRA_AFTER_RESPONSE.keys())
async def test_bytes_after_a_complete_response_are_never_passed_on(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    extra: bytes,
    body: bytes,
    connection: bytes,
) -> None:
    """An upstream that says more than its answer cannot answer the visitor's next request.

    As nginx: the answer is delivered, the extra bytes are dropped and that
    upstream connection is not reused; the visitor's next request goes to a
    fresh one.
    """
    head = b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n" % (connection, len(body))
    upstream = RawUpstream(head + body + extra, close_after=False)
    async with await upstream.start():
        server = start_server()
        start_client(server, f"http://127.0.0.1:{upstream.port}")
        mark = server.process.mark()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        responses = ResponseReader(reader)
        for path in ("/first", "/second"):
            writer.write(raw_get(path))
            response = await asyncio.wait_for(responses.next(), 10)
            assert (response.status, response.body) == (200, body)
        assert upstream.connections == 2  # the first stream was not reused
        writer.write(raw_get("/third"))
        third = await asyncio.wait_for(responses.next(), 10)
        assert (third.status, third.body) == (200, body)  # never the 201 "evil"
        await server.process.wait_for_async("sent more than the response; dropped", since=mark)
        writer.close()


async def test_a_response_cut_short_after_its_head_is_not_completed_for_the_visitor(
    start_server: Callable[..., ExitServerProcess], start_client: Callable[..., ClientProcess]
) -> None:
    upstream = RawUpstream(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
    async with await upstream.start():
        server = start_server()
        start_client(server, f"http://127.0.0.1:{upstream.port}")
        response = await request("127.0.0.1", server.port, raw_get("/"))
        assert response.status == 200
        assert not response.complete
        assert response.body == b"only part"


async def test_a_close_delimited_response_is_rechunked_for_http11_visitors(
    start_server: Callable[..., ExitServerProcess], start_client: Callable[..., ClientProcess]
) -> None:
    upstream = RawUpstream(
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the connection closes"
    )
    async with await upstream.start():
        server = start_server()
        start_client(server, f"http://127.0.0.1:{upstream.port}")
        response = await request("127.0.0.1", server.port, raw_get("/"))
        assert response.complete
        assert response.chunked
        assert response.body == b"until the connection closes"
        http10 = await request("127.0.0.1", server.port, b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
        assert http10.body == b"until the connection closes"
        assert http10.header("Connection") == b"close"


async def test_error_bodies_are_short_fixed_text_with_no_addresses(
    start_server: Callable[..., ExitServerProcess], start_client: Callable[..., ClientProcess]
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    server = start_server()
    start_client(server, f"http://127.0.0.1:{closed_port}")
    response = await request("127.0.0.1", server.port, raw_get("/"))
    assert response.status == 502
    assert len(response.body) < 80
    for leak in (str(closed_port).encode(), b"127.0.0.1", b"refused", b"Errno", b"Traceback"):
        assert leak not in response.body


# -- routing ------------------------------------------------------------------------------------


async def test_several_clients_share_a_host_and_the_others_carry_on_when_one_leaves(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    start_upstream: Callable[..., Upstream],
) -> None:
    server = start_server()
    first, second = start_upstream("first"), start_upstream("second")
    pi1 = start_client(server, f"fn.example.com={first.url}", name="pi1")
    start_client(server, f"fn.example.com={second.url}", name="pi2")
    bodies = [
        (await request("127.0.0.1", server.port, raw_get("/", "fn.example.com"))).body
        for _ in range(10)
    ]
    assert set(bodies) == {b"hello from first\n", b"hello from second\n"}
    assert bodies.count(b"hello from first\n") == 5
    pi1.process.kill()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        response = await request("127.0.0.1", server.port, raw_get("/", "fn.example.com"))
        if response.body == b"hello from second\n":
            break
    answers = [
        await request("127.0.0.1", server.port, raw_get("/", "fn.example.com")) for _ in range(10)
    ]
    assert all((r.status, r.body) == (200, b"hello from second\n") for r in answers)


async def test_an_exact_host_wins_over_another_clients_default_route(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    start_upstream: Callable[..., Upstream],
) -> None:
    server = start_server()
    fallback, functions = start_upstream("fallback"), start_upstream("functions")
    start_client(server, fallback.url, name="web")
    start_client(server, f"fn.example.com={functions.url}", name="faas")
    for _ in range(4):
        assert (
            await request("127.0.0.1", server.port, raw_get("/", "FN.example.com:80"))
        ).body == b"hello from functions\n"
        assert (
            await request("127.0.0.1", server.port, raw_get("/", "www.example.com"))
        ).body == b"hello from fallback\n"


async def test_host_rewrite_sends_the_upstreams_own_name(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    upstream: Upstream,
) -> None:
    server = start_server()
    start_client(server, upstream.url, flags=("--rewrite-host", "default"))
    response = await request("127.0.0.1", server.port, raw_get("/inspect", "public.example"))
    headers = {k.lower(): v for k, v in json.loads(response.body)["headers"]}
    assert headers["host"] == f"127.0.0.1:{upstream.port}"
    assert headers["x-forwarded-host"] == "public.example"


# -- access log ------------------------------------------------------------------------------------


async def test_each_request_gets_one_access_log_line_with_control_characters_escaped(
    tunnel: Tunnel,
) -> None:
    server, _ = tunnel
    mark = server.process.mark()
    await request("127.0.0.1", server.port, raw_get("/inspect/%1b%5b2J?secret=query"))
    await request(
        "127.0.0.1",
        server.port,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    )
    await request("127.0.0.1", server.port, b"GET /\xc3\xa9\x7f HTTP/1.1\r\nHost: a\r\n\r\n")
    line = (
        await server.process.wait_for_async(r"access: pi \"GET /inspect/%1b%5b2J\"", since=mark)
    ).string
    assert re.search(r"host=app\.example status=200 in=0 out=\d+ ms=\d+\.\d", line)
    assert "secret=query" not in server.process.output
    post = (await server.process.wait_for_async(r"access: pi \"POST /echo\"", since=mark)).string
    assert "status=200 in=5 out=5" in post
    lines = server.process.output.splitlines()[mark:]
    assert not any("\x7f" in line or "\x1b" in line for line in lines)


# -- memory and fairness ------------------------------------------------------------------------------


async def test_a_slow_visitor_holds_one_window_and_does_not_slow_the_others(
    tunnel: Tunnel, token: str
) -> None:
    server, _ = tunnel
    # A visitor that asks for 200 MiB and then reads a trickle.
    slow = socket.create_connection(("127.0.0.1", server.port))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    slow.sendall(raw_get(f"/pattern/{200 * MIB}"))
    try:
        slow.setblocking(False)
        read = 0
        latencies: list[float] = []
        baseline: list[float] = []
        for _ in range(5):
            started = time.monotonic()
            await request("127.0.0.1", server.port, raw_get("/"))
            baseline.append(time.monotonic() - started)
        for n in range(40):
            with contextlib.suppress(BlockingIOError):
                read += len(slow.recv(16 * 1024))
            started = time.monotonic()
            response = await request("127.0.0.1", server.port, raw_get("/"))
            latencies.append(time.monotonic() - started)
            assert response.status == 200
            if n % 10 == 9:
                status = await status_of(server, token)
                (client,) = status["clients"]
                # What the server holds for the slow visitor: its stream's window
                # plus the socket's write buffer, never the body.
                assert client["held_bytes"] <= DEFAULT_WINDOW_BYTES
                assert status["visitor_write_buffer_bytes"] <= 1 * MIB
        assert read < 20 * MIB
        assert statistics.median(latencies) < max(0.1, 5 * statistics.median(baseline))
        assert max(latencies) < 1.0
    finally:
        slow.close()


async def test_a_request_pipelined_after_a_large_body_is_served(tunnel: Tunnel) -> None:
    server, client = tunnel
    body = pattern_body(300 * 1024)
    upload = b"POST /sha256 HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(upload + raw_get("/") + raw_get("/inspect/third"))
    answers = []
    responses = ResponseReader(reader)
    try:
        for _ in range(3):
            answers.append(await responses.next())
    except ConnectionError:
        logs = "\n".join([*server.process.lines[-40:], "--- client", *client.process.lines[-20:]])
        raise AssertionError(
            f"answered {[(a.status, a.headers) for a in answers]}\n{logs}"
        ) from None
    first, second, third = answers
    writer.close()
    assert json.loads(first.body) == {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
    assert (second.status, second.body) == (200, b"hello from upstream\n")
    assert json.loads(third.body)["raw_path"] == "/inspect/third"
