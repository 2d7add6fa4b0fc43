"""Raw TCP ports end to end (server/tcp.py): real processes, a real TCP upstream, real sockets.

``homeport server --tcp-port P`` and ``homeport client --tcp P=ADDRESS:PORT``
carry every connection made to P, byte for byte, to the upstream: it speaks
first, echoes, and on the visitor's half-close says what it got and closes
(tests/support/tcp_upstream.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import aiohttp
import pytest

from tests.e2e.conftest import (
    ClientProcess,
    ExitServerProcess,
    Processes,
    Upstream,
    scrape_metrics,
)
from tests.support.ports import free_port
from tests.support.processes import Process, homeport
from tests.support.tcp_upstream import GREETING, RESET_ME
from tests.support.upstream import pattern_body
from tunnel.mux import RATE_WINDOW_S

MIB = 1024 * 1024
TIMEOUT_S = 20.0
#: connections made and reset at once: more than the client's rapid-reset guard's
#: 2,000 in a window (tunnel/mux.py), were they counted
FLOOD = 2400
FLOOD_WORKERS = 8
DRAIN_S = 2.0


@dataclass
class TcpUpstream:
    process: Process
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def tcp_upstream(processes: Processes) -> TcpUpstream:
    process = processes.start("tcp-upstream", [sys.executable, "-m", "tests.support.tcp_upstream"])
    port = int(process.wait_for(r"tcp upstream listening on 127\.0\.0\.1:(\d+)").group(1))
    return TcpUpstream(process, port)


@pytest.fixture
def tcp_tunnel(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    tcp_upstream: TcpUpstream,
) -> tuple[ExitServerProcess, int]:
    """An exit server with a TCP port, and a client serving only that port."""
    port = free_port()
    server = start_server("--tcp-port", str(port))
    start_client(server, flags=("--tcp", f"{port}={tcp_upstream.address}"))
    return server, port


async def exchange(port: int, payload: bytes) -> tuple[bytes, bytes, bytes]:
    """Connect, read the greeting, send ``payload`` while reading its echo, half-close,
    and read to the end: the greeting, the echo and the upstream's last line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(TIMEOUT_S):
            greeting = await reader.readexactly(len(GREETING))

            async def send() -> None:
                for start in range(0, len(payload), 64 * 1024):
                    writer.write(payload[start : start + 64 * 1024])
                    await writer.drain()
                writer.write_eof()

            sending = asyncio.create_task(send())
            echo = await reader.readexactly(len(payload))
            await sending
            last = await reader.read()  # to the end: the upstream closed after it
    finally:
        writer.close()
    return greeting, echo, last


def summary(payload: bytes) -> bytes:
    return f"got {len(payload)} bytes, sha256 {hashlib.sha256(payload).hexdigest()}\n".encode()


async def test_a_tcp_port_carries_bytes_both_ways_and_the_half_close(
    tcp_tunnel: tuple[ExitServerProcess, int], tcp_upstream: TcpUpstream
) -> None:
    server, port = tcp_tunnel
    payload = pattern_body(8 * MIB)
    greeting, echo, last = await exchange(port, payload)
    assert greeting == GREETING  # the upstream spoke first
    assert echo == payload  # 8 MiB each way, bit-exact
    # Our half-close reached the upstream, which still answered and then closed.
    assert last == summary(payload)
    await tcp_upstream.process.wait_for_async(
        rf"tcp connection ended after {len(payload)} bytes \(closed"
    )
    await server.process.wait_for_async(
        rf'pi "TCP :{port}" host=- status=200 in={len(payload)} '
        rf"out={len(GREETING) + len(payload) + len(last)} "
    )


async def test_tcp_connections_are_counted_in_the_metrics(
    tcp_tunnel: tuple[ExitServerProcess, int], token: str
) -> None:
    server, port = tcp_tunnel
    for payload in (b"one", b"two"):
        mark = server.process.mark()
        await exchange(port, payload)
        await server.process.wait_for_async(
            rf'pi "TCP :{port}" host=- status=200 in=3 ', since=mark
        )
    metrics = await scrape_metrics(server, token)
    assert metrics["homeport_tcp_connections_total", f"client=pi,port={port},code=200"] == 2
    assert metrics["homeport_visitor_bytes_total", "client=pi,way=in"] == 6
    assert metrics["homeport_visitor_connections", "kind=tcp"] == 0
    assert not [name for name, _ in metrics if name.startswith("homeport_http_requests")]


async def test_many_tcp_connections_at_once_each_arrive_intact(
    tcp_tunnel: tuple[ExitServerProcess, int],
) -> None:
    _, port = tcp_tunnel
    payloads = [os.urandom(1000 + 7919 * i) for i in range(40)]
    results = await asyncio.gather(*(exchange(port, p) for p in payloads))
    for payload, (greeting, echo, last) in zip(payloads, results, strict=True):
        assert (greeting, echo, last) == (GREETING, payload, summary(payload))


async def test_a_client_serving_only_tcp_leaves_http_unrouted(
    tcp_tunnel: tuple[ExitServerProcess, int],
) -> None:
    server, port = tcp_tunnel
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/") as response:
        assert response.status == 503
    greeting, _, last = await exchange(port, b"still fine")
    assert (greeting, last) == (GREETING, summary(b"still fine"))


async def wait_reset_or_closed(port: int) -> bytes:
    """Connect and read: what came before the connection was reset or closed.

    A reset that comes as the connection is made may fail the connect itself.
    """
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionResetError:
        return b"reset"
    try:
        async with asyncio.timeout(TIMEOUT_S):
            return await reader.read()
    except ConnectionResetError:
        return b"reset"
    finally:
        writer.close()


async def test_a_tcp_port_no_client_serves_resets_its_visitors(
    start_server: Callable[..., ExitServerProcess],
) -> None:
    port = free_port()
    server = start_server("--tcp-port", str(port))
    assert await wait_reset_or_closed(port) == b"reset"
    await server.process.wait_for_async(rf'- "TCP :{port}" host=- status=503 in=0 out=0 ')


async def test_an_upstream_that_refuses_resets_the_visitor(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
) -> None:
    port, closed = free_port(), free_port()
    server = start_server("--tcp-port", str(port))
    client = start_client(server, flags=("--tcp", f"{port}=127.0.0.1:{closed}"))
    assert await wait_reset_or_closed(port) == b"reset"
    await client.process.wait_for_async(rf"cannot connect to upstream tcp://127\.0\.0\.1:{closed}")
    await server.process.wait_for_async(rf'pi "TCP :{port}" host=- status=502 in=0 out=0 ')


async def test_tcp_connections_count_against_the_clients_stream_limit(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    tcp_upstream: TcpUpstream,
) -> None:
    port = free_port()
    server = start_server("--tcp-port", str(port), "--max-streams-per-client", "1")
    start_client(server, flags=("--tcp", f"{port}={tcp_upstream.address}"))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(TIMEOUT_S):
            assert await reader.readexactly(len(GREETING)) == GREETING
        assert await wait_reset_or_closed(port) == b"reset"  # the one stream is taken
        await server.process.wait_for_async(rf'pi "TCP :{port}" host=- status=503 in=0 out=0 ')
    finally:
        writer.close()
    await server.process.wait_for_async(rf'pi "TCP :{port}" host=- status=200 ')  # the first ended
    greeting, _, last = await exchange(port, b"next")  # and its stream is free again
    assert (greeting, last) == (GREETING, summary(b"next"))


def test_a_flood_of_visitors_that_reset_at_once_leaves_the_session_up(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    tcp_upstream: TcpUpstream,
) -> None:
    """Connections made and reset before a byte (a port scan): each an OPEN and a RST.

    More than the client's rapid-reset guard allows in one window (2,000 in
    10 s, tunnel/mux.py) would end its session, were they counted.
    """
    port = free_port()
    server = start_server("--tcp-port", str(port))
    client = start_client(server, flags=("--tcp", f"{port}={tcp_upstream.address}"))
    session = client.wait_connected()

    def connect_and_reset(count: int) -> None:
        for _ in range(count):
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    started = time.monotonic()
    with ThreadPoolExecutor(FLOOD_WORKERS) as pool:
        list(pool.map(connect_and_reset, [FLOOD // FLOOD_WORKERS] * FLOOD_WORKERS))
    took = time.monotonic() - started
    assert took < RATE_WINDOW_S, f"the flood took {took:.1f} s, more than one guard window"
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        assert sock.recv(len(GREETING)) == GREETING  # served, after the flood
    assert "ENHANCE_YOUR_CALM" not in client.process.output
    assert client.process.output.count("connected to ws://") == 1, session


def test_a_visitor_that_resets_resets_the_upstream_connection(
    tcp_tunnel: tuple[ExitServerProcess, int], tcp_upstream: TcpUpstream
) -> None:
    server, port = tcp_tunnel
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        got = b""
        sock.sendall(b"x" * 1000)
        while len(got) < len(GREETING) + 1000:
            got += sock.recv(65536)
        assert got == GREETING + b"x" * 1000
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # closed with SO_LINGER 0: a reset, which reaches the upstream as a reset (RFC 9113 §8.5)
    tcp_upstream.process.wait_for(r"tcp connection ended after 1000 bytes \(reset\)", TIMEOUT_S)
    logged = server.process.wait_for(rf'"TCP :{port}" .*status=(\d+)')
    assert logged.group(1) == "200"  # carried, then the visitor went


async def test_an_upstream_that_resets_resets_the_visitor(
    tcp_tunnel: tuple[ExitServerProcess, int], tcp_upstream: TcpUpstream
) -> None:
    server, port = tcp_tunnel
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(TIMEOUT_S):
            assert await reader.readexactly(len(GREETING)) == GREETING
            writer.write(RESET_ME)
            with pytest.raises(ConnectionResetError):
                await reader.read()  # a reset, never the clean end of b""
    finally:
        writer.close()
    await tcp_upstream.process.wait_for_async(r"tcp connection ended after 9 bytes \(reset by us\)")
    await server.process.wait_for_async(rf'pi "TCP :{port}" host=- status=502 in=9 out=6 ')


async def test_a_port_the_exit_server_does_not_listen_on_is_reported_and_http_goes_on(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    upstream: Upstream,
) -> None:
    server = start_server()
    port = free_port()
    client = start_client(server, upstream.url, flags=("--tcp", f"{port}=127.0.0.1:22"))
    await client.process.wait_for_async(
        rf"the exit server does not listen on TCP port {port} \(start it with --tcp-port\)"
    )
    await server.process.wait_for_async(
        rf"client pi asks for TCP port {port}, which this exit server"
    )
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/") as response:
        assert response.status == 200


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("client", "--tcp", "2222"), "must be PUBLIC_PORT=ADDRESS:PORT"),
        (("client", "--tcp", "ssh=127.0.0.1:22"), "must be PUBLIC_PORT=ADDRESS:PORT"),
        (("client", "--tcp", "70000=127.0.0.1:22"), "must be PUBLIC_PORT=ADDRESS:PORT"),
        (("client", "--tcp", "2222=127.0.0.1"), "is not ADDRESS:PORT"),
        (("client", "--tcp", "2222=127.0.0.1:99999"), "is not ADDRESS:PORT"),
        (("client", "--tcp", "2222=127.0.0.1:22", "--tcp", "2222=127.0.0.1:23"), "given twice"),
        (("server", "--tcp-port", "8123"), "--tcp-port 8123 is the --control-port already"),
        (("server", "--tcp-port", "2222", "--tcp-port", "2222"), "--tcp-port 2222 is given twice"),
        (("server", "--tcp-port", "0"), "0 is not in the range 1<=x<=65535"),
    ],
)
def test_a_bad_tcp_flag_is_refused_with_a_clear_message(
    args: tuple[str, ...], message: str
) -> None:
    side = ("--url", "ws://127.0.0.1:1") if args[0] == "client" else ()
    result = subprocess.run(
        homeport(*args, *side, "--token", "t" * 43),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


async def test_on_sigterm_a_tcp_connection_is_carried_until_the_drain_time_is_up(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    tcp_upstream: TcpUpstream,
) -> None:
    port = free_port()
    server = start_server("--tcp-port", str(port), "--drain-timeout", str(DRAIN_S))
    start_client(server, flags=("--tcp", f"{port}={tcp_upstream.address}"))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(TIMEOUT_S):
            assert await reader.readexactly(len(GREETING)) == GREETING
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            await server.process.wait_for_async("shutting down")
            writer.write(b"still here")  # carried while the exit server drains
            assert await reader.readexactly(10) == b"still here"
            assert await server.process.wait_async(TIMEOUT_S) == 0
            took = time.monotonic() - signalled
            ended = await reader.read()  # the connection was cut as the drain ended
    except ConnectionResetError:
        ended = b""
        took = time.monotonic() - signalled
    finally:
        writer.close()
    assert ended == b""
    assert DRAIN_S <= took < DRAIN_S + 10, took
