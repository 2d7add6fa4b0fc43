"""The tunnel end to end: real server and client processes, a real upstream, real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.conftest import ClientProcess, ExitServerProcess, Upstream
from tests.support.upstream import pattern_body, pattern_sha256
from tests.support.waiting import wait_until
from tunnel.auth import write_secret_file

MIB = 1024 * 1024


async def fetch(url: str, **kwargs: object) -> tuple[int, bytes, aiohttp.typedefs.LooseHeaders]:
    async with aiohttp.ClientSession() as http, http.get(url, **kwargs) as response:  # type: ignore[arg-type]
        return response.status, await response.read(), response.headers


async def test_a_ten_mib_binary_file_arrives_intact(
    tunnel: tuple[ExitServerProcess, ClientProcess],
) -> None:
    server, _ = tunnel
    status, body, headers = await fetch(f"{server.url}/pattern/{10 * MIB}")
    assert status == 200
    assert headers["Content-Length"] == str(10 * MIB)
    assert hashlib.sha256(body).hexdigest() == pattern_sha256(10 * MIB)


async def test_a_ten_mib_upload_streams_to_the_upstream_intact(
    tunnel: tuple[ExitServerProcess, ClientProcess],
) -> None:
    server, _ = tunnel
    body = pattern_body(10 * MIB)
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{server.url}/sha256", data=io.BytesIO(body)) as response,
    ):
        assert response.status == 200
        result = await response.json()
    assert result == {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}


async def test_a_chunked_upload_arrives_intact(
    tunnel: tuple[ExitServerProcess, ClientProcess],
) -> None:
    server, _ = tunnel

    async def chunks():  # type: ignore[no-untyped-def]
        for i in range(50):
            yield bytes([i]) * 10_000

    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{server.url}/sha256", data=chunks()) as response,
    ):
        result = await response.json()
    expected = b"".join(bytes([i]) * 10_000 for i in range(50))
    assert result == {"sha256": hashlib.sha256(expected).hexdigest(), "size": len(expected)}


async def test_a_hundred_concurrent_requests_all_succeed(
    tunnel: tuple[ExitServerProcess, ClientProcess],
) -> None:
    server, _ = tunnel
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one(n: int) -> tuple[int, bytes]:
            async with http.get(f"{server.url}/pattern/{1000 + n}") as response:
                return response.status, await response.read()

        results = await asyncio.gather(*(one(n) for n in range(100)))
    for n, (status, body) in enumerate(results):
        assert status == 200
        assert body == pattern_body(1000 + n)


async def test_no_connected_client_gives_503_at_once(
    start_server: Callable[..., ExitServerProcess],
) -> None:
    server = start_server()
    started = time.monotonic()
    status, body, headers = await fetch(f"{server.url}/")
    assert status == 503
    assert time.monotonic() - started < 1.0
    assert headers["Content-Type"].startswith("text/plain")
    assert headers["Retry-After"] == "5"
    assert body.startswith(b"503 ")
    assert len(body) < 100


async def test_a_wrong_token_gives_no_tunnel_and_a_clear_client_message(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    upstream: Upstream,
    tmp_path: os.PathLike[str],
) -> None:
    server = start_server()
    wrong = os.path.join(tmp_path, "wrong-token")
    write_secret_file(Path(wrong), "not-the-right-token-at-all")
    client = start_client(server, upstream.url, token_path=wrong, wait=False)  # type: ignore[arg-type]
    await client.process.wait_for_async(r"token rejected by server \(HTTP 401\)")
    await server.process.wait_for_async(r"rejected a client from 127\.0\.0\.1:\d+: wrong token")
    status, _, _ = await fetch(f"{server.url}/")
    assert status == 503
    assert "not-the-right-token" not in client.process.output + server.process.output


async def test_killing_the_client_turns_requests_into_502_or_503_within_seconds(
    tunnel: tuple[ExitServerProcess, ClientProcess],
) -> None:
    server, client = tunnel
    assert (await fetch(f"{server.url}/"))[0] == 200
    client.process.kill()
    started = time.monotonic()
    statuses: list[int] = []

    async def failing() -> bool:
        statuses.append((await fetch(f"{server.url}/"))[0])
        return statuses[-1] in (502, 503)

    while not await failing():
        assert time.monotonic() - started < 5, statuses
        await asyncio.sleep(0.05)


async def test_a_request_on_a_reused_stream_gets_502_when_the_client_dies(
    tunnel: tuple[ExitServerProcess, ClientProcess], upstream: Upstream
) -> None:
    """A whole session lost is no stale pooled stream: no retry, and 502 as on a fresh one."""
    server, client = tunnel
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/") as first:
            assert first.status == 200  # its stream goes back to the pool
            await first.read()
        mark = upstream.process.mark()
        slow = asyncio.create_task(fetch(f"{server.url}/slow?seconds=60"))
        await upstream.process.wait_for_async(r"answering in 60", since=mark)
        client.process.kill()
        status, body, _ = await asyncio.wait_for(slow, 10)
    assert status == 502, body


@contextlib.asynccontextmanager
async def silent_control_port() -> AsyncIterator[tuple[int, list[asyncio.StreamWriter]]]:
    """A port that accepts connections and never says a word on them."""
    held: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda _, writer: held.append(writer), "127.0.0.1", 0)
    async with silent:
        yield silent.sockets[0].getsockname()[1], held
        for writer in held:
            writer.close()


def dial_silent_port(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    upstream: Upstream,
    port: int,
    handshake_timeout: str,
) -> ClientProcess:
    return start_client(
        start_server(),
        upstream.url,
        url=f"ws://127.0.0.1:{port}",
        flags=("--handshake-timeout", handshake_timeout),
        wait=False,
    )


async def test_a_handshake_that_never_completes_is_given_up_after_the_handshake_timeout(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    upstream: Upstream,
) -> None:
    """A silent control port (a black-holing middlebox) costs one timeout per attempt."""
    async with silent_control_port() as (port, held):
        client = dial_silent_port(start_server, start_client, upstream, port, "1.5")
        started = time.monotonic()
        pattern = rf"no answer from ws://127\.0\.0\.1:{port}/connect within 1\.5 s"
        await client.process.wait_for_async(pattern)
        assert 1.4 < time.monotonic() - started < 8
        first = client.process.mark()
        await client.process.wait_for_async(pattern, since=first)  # and it keeps trying
        assert len(held) >= 2
        assert client.process.running()


async def test_a_client_told_to_stop_while_dialling_stops_at_once(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    upstream: Upstream,
) -> None:
    async with silent_control_port() as (port, held):
        client = dial_silent_port(start_server, start_client, upstream, port, "60")
        await wait_until(lambda: bool(held), 10)  # the client is dialling the silent port
        started = time.monotonic()
        client.process.send_signal(signal.SIGTERM)
        assert await client.process.wait_async(15) == 0
        assert time.monotonic() - started < 5  # not the 60 s the dial could have taken
        assert "no answer from" not in client.process.output


async def test_restarting_the_server_brings_the_same_client_back(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    upstream: Upstream,
) -> None:
    server = start_server()
    client = start_client(server, upstream.url)
    mark = client.process.mark()
    assert server.process.stop() == 0
    await client.process.wait_for_async(r"reconnecting in", since=mark)
    again = start_server(port=server.port, control_port=server.control_port)
    await asyncio.to_thread(client.wait_connected, 20.0, mark)
    assert client.process.running()
    status, body, _ = await fetch(f"{again.url}/")
    assert (status, body) == (200, b"hello from upstream\n")


async def test_sigterm_lets_in_flight_requests_finish_and_exits_0(
    tunnel: tuple[ExitServerProcess, ClientProcess], upstream: Upstream
) -> None:
    server, client = tunnel
    async with aiohttp.ClientSession() as http:
        mark = upstream.process.mark()
        slow = asyncio.create_task(http.get(f"{server.url}/slow?seconds=1.5"))
        await upstream.process.wait_for_async(r"answering in 1\.5 s", since=mark)
        server.process.send_signal(signal.SIGTERM)
        response = await slow
        assert response.status == 200
        assert await response.read() == b"slow but done\n"
        response.release()
    assert await server.process.wait_async(15) == 0
    assert "exit server stopped" in server.process.output
    await client.process.wait_for_async(r"disconnected from the exit server: GOING_AWAY")


async def test_a_request_still_unanswered_when_the_drain_time_is_up_gets_503(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    upstream: Upstream,
) -> None:
    server = start_server("--drain-timeout", "1")
    start_client(server, upstream.url)
    mark = upstream.process.mark()
    slow = asyncio.create_task(fetch(f"{server.url}/slow?seconds=60"))
    await upstream.process.wait_for_async(r"answering in 60", since=mark)
    server.process.send_signal(signal.SIGTERM)
    status, body, headers = await asyncio.wait_for(slow, 10)
    assert (status, body) == (503, b"503 service unavailable: the exit server is restarting\n")
    assert headers["Retry-After"] == "5"
    assert await server.process.wait_async(15) == 0
    assert re.search(r'access: pi "GET /slow" .*status=503 ', server.process.output)


async def test_the_upstream_sees_forwarding_headers_and_no_hop_by_hop_ones(
    tunnel: tuple[ExitServerProcess, ClientProcess],
) -> None:
    server, _ = tunnel
    request_headers = {
        "Host": "fn.example.com",
        "X-Forwarded-For": "6.6.6.6",
        "X-Forwarded-Host": "evil.example",
        "X-Real-IP": "6.6.6.6",
        "Forwarded": "for=6.6.6.6",
        "Connection": "keep-alive, X-Secret-Hop, Authorization",
        "X-Secret-Hop": "must not pass",
        "Authorization": "Bearer named-in-connection",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Trailer": "X-T",
        "Proxy-Authorization": "Basic Zm9v",
        "Proxy-Connection": "keep-alive",
        "X-Kept": "a",
    }
    status, body, _ = await fetch(f"{server.url}/headers", headers=request_headers)
    assert status == 200
    seen = json.loads(body)["headers"]
    names = [name.lower() for name, _ in seen]
    values = {name.lower(): value for name, value in seen}
    assert values["host"] == "fn.example.com"
    assert values["x-forwarded-for"] == "127.0.0.1"
    assert values["x-forwarded-proto"] == "http"
    assert values["x-forwarded-host"] == "fn.example.com"
    assert values["x-kept"] == "a"
    assert names.count("x-forwarded-for") == 1
    hops = ("x-secret-hop", "authorization", "keep-alive", "connection", "te", "trailer")
    for hop in (*hops, "proxy-authorization", "proxy-connection", "x-real-ip", "forwarded"):
        assert hop not in names


async def test_requests_are_routed_by_host_with_a_default_route(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    start_upstream: Callable[..., Upstream],
) -> None:
    functions = start_upstream("functions")
    website = start_upstream("website")
    server = start_server()
    start_client(server, f"fn.example.com={functions.url}", website.url)
    for host, expected in [
        ("fn.example.com", b"hello from functions\n"),
        ("FN.Example.COM.:80", b"hello from functions\n"),
        ("www.example.com", b"hello from website\n"),
        ("203.0.113.10", b"hello from website\n"),
    ]:
        status, body, _ = await fetch(f"{server.url}/", headers={"Host": host})
        assert (status, body) == (200, expected), host


async def test_a_client_serving_only_named_hosts_leaves_others_unrouted(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    upstream: Upstream,
) -> None:
    server = start_server()
    start_client(server, f"fn.example.com={upstream.url}")
    assert (await fetch(f"{server.url}/", headers={"Host": "fn.example.com"}))[0] == 200
    assert (await fetch(f"{server.url}/", headers={"Host": "other.example.com"}))[0] == 503


async def test_upstream_refusing_connections_gives_502_at_once(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    server = start_server()
    start_client(server, f"http://127.0.0.1:{closed_port}")
    started = time.monotonic()
    status, body, _ = await fetch(f"{server.url}/")
    assert status == 502
    assert time.monotonic() - started < 2
    assert str(closed_port).encode() not in body


async def test_keep_alive_requests_reuse_streams(
    tunnel: tuple[ExitServerProcess, ClientProcess],
) -> None:
    server, _ = tunnel
    async with aiohttp.ClientSession() as http:
        for _ in range(50):
            async with http.get(f"{server.url}/") as response:
                assert await response.read() == b"hello from upstream\n"


@pytest.mark.timeout(180)
async def test_a_one_gib_download_holds_memory_flat_on_both_sides(
    tunnel: tuple[ExitServerProcess, ClientProcess],
) -> None:
    server, client = tunnel
    size = 1024 * MIB
    baseline = {"server": server.process.rss_bytes(), "client": client.process.rss_bytes()}
    peak = dict(baseline)
    digest = hashlib.sha256()
    received = 0
    timeout = aiohttp.ClientTimeout(total=150)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.get(f"{server.url}/pattern/{size}") as response,
    ):
        assert response.status == 200
        async for chunk in response.content.iter_chunked(1 * MIB):
            digest.update(chunk)
            received += len(chunk)
            if received % (32 * MIB) < len(chunk):
                peak["server"] = max(peak["server"], server.process.rss_bytes())
                peak["client"] = max(peak["client"], client.process.rss_bytes())
    assert received == size
    assert digest.hexdigest() == pattern_sha256(size)
    for side in ("server", "client"):
        growth = peak[side] - baseline[side]
        assert growth < 48 * MIB, f"{side} grew by {growth / MIB:.1f} MiB"


async def server_status(server: ExitServerProcess, token: str) -> dict:
    headers = {"Authorization": f"Bearer {token}"}
    status, body, _ = await fetch(f"http://127.0.0.1:{server.control_port}/status", headers=headers)
    assert status == 200
    return json.loads(body)


async def test_finished_requests_leave_no_stream_state_on_the_server(
    tunnel: tuple[ExitServerProcess, ClientProcess], token: str
) -> None:
    server, _ = tunnel
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for _ in range(3):
            responses = await asyncio.gather(*(http.get(f"{server.url}/") for _ in range(30)))
            for response in responses:
                assert await response.read() == b"hello from upstream\n"
                response.release()
    status = await server_status(server, token)
    (client,) = status["clients"]
    assert client["name"] == "pi"
    assert client["streams"] == client["idle_streams"]  # only pooled keep-alive streams remain
    assert status["requests_in_flight"] == 0

    async def drained() -> bool:
        (client,) = (await server_status(server, token))["clients"]
        return client["streams"] == 0 and client["mux_streams"] == 0

    deadline = time.monotonic() + 20  # pooled streams retire after 4 s idle
    while not await drained():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)


async def test_status_needs_the_token(tunnel: tuple[ExitServerProcess, ClientProcess]) -> None:
    server, _ = tunnel
    status, body, _ = await fetch(f"http://127.0.0.1:{server.control_port}/status")
    assert status == 401
    assert b"clients" not in body


# -- several connections per client ------------------------------------------------------


def lines_matching(client: ClientProcess, pattern: str, since: int = 0) -> int:
    return sum(1 for line in client.process.lines[since:] if re.search(pattern, line))


async def start_with_two_connections(
    server: ExitServerProcess, start_client: Callable[..., ClientProcess], upstream: Upstream
) -> ClientProcess:
    client = start_client(server, upstream.url, flags=("--connections", "2"), wait=False)
    for n in (1, 2):
        await client.process.wait_for_async(rf"connected to .*; connection {n} of 2; serving")
    return client


async def test_a_client_with_two_connections_sends_requests_past_the_busy_one(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    upstream: Upstream,
    token: str,
) -> None:
    server = start_server()
    await start_with_two_connections(server, start_client, upstream)
    sessions = (await server_status(server, token))["clients"]
    assert [(s["name"], s["connection"], s["connections"]) for s in sessions] == [
        ("pi", 0, 2),
        ("pi", 1, 2),
    ]

    slow = asyncio.create_task(fetch(f"{server.url}/slow?seconds=3"))
    deadline = time.monotonic() + 10
    while True:  # until the slow request holds one of the two connections
        sessions = (await server_status(server, token))["clients"]
        held = [n for n, s in enumerate(sessions) if s["streams"] - s["idle_streams"] == 1]
        if held:
            break
        assert time.monotonic() < deadline, sessions
        await asyncio.sleep(0.05)
    (busy,) = held
    free = 1 - busy
    for _ in range(10):
        status, body, _ = await fetch(f"{server.url}/")
        assert (status, body) == (200, b"hello from upstream\n")
    after = (await server_status(server, token))["clients"]
    assert after[busy]["bytes_to_client"] == sessions[busy]["bytes_to_client"]
    assert after[free]["bytes_to_client"] > sessions[free]["bytes_to_client"]
    status, body, _ = await slow
    assert (status, body) == (200, b"slow but done\n")


async def test_a_new_run_of_a_client_replaces_all_its_connections(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    upstream: Upstream,
    token: str,
) -> None:
    # After a power cut the Pi's new run finds its old sessions still
    # registered (ghosts until the heartbeat times out): every one of them
    # goes, not just the one with the new session's number.
    server = start_server()
    old = await start_with_two_connections(server, start_client, upstream)
    mark = old.process.mark()
    new = start_client(server, upstream.url, name="pi", flags=("--reconnect-max-delay", "30"))
    replaced = r"replaced this session with a newer one named pi"
    await wait_until(lambda: lines_matching(old, replaced, mark) == 2)
    new.process.stop()

    async def old_back() -> bool:
        sessions = (await server_status(server, token))["clients"]
        return [(s["connection"], s["connections"]) for s in sessions] == [(0, 2), (1, 2)]

    deadline = time.monotonic() + 20
    while not await old_back():
        assert time.monotonic() < deadline, "the old run did not come back with both connections"
        await asyncio.sleep(0.1)
    status, body, _ = await fetch(f"{server.url}/")
    assert (status, body) == (200, b"hello from upstream\n")
