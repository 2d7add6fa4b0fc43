"""The control port admits connections before their handshake (server/control.py).

A connection that has not finished its handshake (TLS, then the HTTP
upgrade) holds a socket and, over TLS, tens of KiB: the port holds at most
MAX_HANDSHAKES of them, MAX_HANDSHAKES_PER_ADDRESS from one address, closes
the rest as they are accepted, and gives each one HANDSHAKE_TIMEOUT_S from
its accept for TLS and HTTP together. These run a real ControlServer on
127.0.0.1 (TLS with a self-signed certificate) and dial it with real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server import control
from server.config import ServerConfig
from server.control import MAX_HANDSHAKES, MAX_HANDSHAKES_PER_ADDRESS, ControlServer
from server.registry import Registry
from tests.support.waiting import wait_until
from tunnel.auth import TokenVerifier, generate_token, token_digest
from tunnel.tls import ensure_self_signed

#: A refused connection is closed as it is accepted: far sooner than this.
REFUSED_WITHIN_S = 5.0


@contextlib.asynccontextmanager
async def control_server(
    tmp_path: Path, *, tls: bool = True
) -> AsyncIterator[tuple[ControlServer, int]]:
    """A control server on 127.0.0.1 and its port; over TLS unless ``tls`` is false."""
    token = generate_token()
    certificate = ensure_self_signed(tmp_path, ["127.0.0.1"]) if tls else None
    config = ServerConfig(
        token_digest=token_digest(token),
        bind="127.0.0.1",
        control_port=0,
        tls_cert=certificate.cert_path if certificate else None,
        tls_key=certificate.key_path if certificate else None,
    )
    server = ControlServer(config, Registry(), TokenVerifier.for_token(token))
    [(_, port)] = await server.listen()
    try:
        yield server, port
    finally:
        server.stop_accepting()


async def dial(
    port: int, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to the control port that sends nothing."""
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def closed_by_peer(reader: asyncio.StreamReader, within: float) -> bool:
    """Whether the server closed the connection (EOF or reset) within ``within`` seconds."""
    try:
        async with asyncio.timeout(within):
            return await reader.read(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def test_one_address_holds_at_most_its_share_of_handshakes(tmp_path: Path) -> None:
    async with control_server(tmp_path) as (server, port):
        held = [await dial(port) for _ in range(MAX_HANDSHAKES_PER_ADDRESS)]
        await wait_until(lambda: len(server.handshakes) == MAX_HANDSHAKES_PER_ADDRESS)
        reader, writer = await dial(port)
        assert await closed_by_peer(reader, REFUSED_WITHIN_S)
        writer.close()
        assert server.handshake_addresses.refused == 1
        # Another address is still let in.
        _, other = await dial(port, "127.0.0.2")
        await wait_until(lambda: len(server.handshakes) == MAX_HANDSHAKES_PER_ADDRESS + 1)
        # Those held are still open, waiting for their deadline, not closed.
        for held_reader, _ in held:
            assert not held_reader.at_eof()
        for _, held_writer in [*held, (None, other)]:
            held_writer.close()
        # Each count is given back as its connection closes.
        await wait_until(lambda: not server.handshakes and not len(server.handshake_addresses))
        reader, writer = await dial(port)
        await wait_until(lambda: len(server.handshakes) == 1)
        writer.close()


async def test_all_addresses_together_hold_at_most_max_handshakes(tmp_path: Path) -> None:
    async with control_server(tmp_path, tls=False) as (server, port):
        writers = []
        addresses = -(-MAX_HANDSHAKES // MAX_HANDSHAKES_PER_ADDRESS)  # rounded up
        for n in range(addresses):
            for _ in range(MAX_HANDSHAKES_PER_ADDRESS):
                writers.append((await dial(port, f"127.0.0.{n + 2}"))[1])
        await wait_until(lambda: len(server.handshakes) == MAX_HANDSHAKES)
        reader, writer = await dial(port, f"127.0.0.{addresses + 2}")
        assert await closed_by_peer(reader, REFUSED_WITHIN_S)
        assert server.handshakes_refused_at_capacity.total == 1
        for held in [*writers, writer]:
            held.close()
        await wait_until(lambda: not server.handshakes)


async def test_tls_and_http_share_one_deadline_from_the_accept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "HANDSHAKE_TIMEOUT_S", 2.0)
    async with control_server(tmp_path) as (server, port):
        started = time.monotonic()
        reader, writer = await dial(port)
        # TLS is done three quarters of the way to the deadline, then no HTTP comes:
        # the connection ends at the deadline, not a whole timeout after TLS.
        await asyncio.sleep(1.5)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        await writer.start_tls(context)
        assert await closed_by_peer(reader, 2.5)
        ended = time.monotonic() - started
        assert ended < 3.0, f"closed {ended:.2f} s after the accept; the deadline was 2 s"
        await wait_until(lambda: not server.handshakes)


async def test_a_silent_connection_is_closed_at_its_deadline_and_its_count_given_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "HANDSHAKE_TIMEOUT_S", 0.5)
    async with control_server(tmp_path) as (server, port):
        reader, writer = await dial(port)
        assert await closed_by_peer(reader, 5.0)
        writer.close()
        await wait_until(lambda: not server.handshakes and not len(server.handshake_addresses))


async def test_stopping_closes_connections_still_in_their_handshake(tmp_path: Path) -> None:
    async with control_server(tmp_path) as (server, port):
        reader, writer = await dial(port)
        await wait_until(lambda: len(server.handshakes) == 1)
        server.stop_accepting()
        assert await closed_by_peer(reader, REFUSED_WITHIN_S)
        writer.close()
        await wait_until(lambda: not server.handshakes)
