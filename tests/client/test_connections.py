"""A client's several connections (``--connections``), against exit servers new and old."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest

import server.control
from client.upstreams import parse_upstreams
from tests.support.ports import free_port
from tests.support.waiting import wait_until
from tests.support.world import running_world
from tunnel.errors import ErrorCode
from tunnel.frames import MAX_STREAM_ID


def an_older_exit_server(monkeypatch: pytest.MonkeyPatch, *, without: str) -> None:
    """Make the exit server's HELLO one from before it said ``without``."""
    newer_hello = server.control.server_hello

    def older_hello(session_id: str, *args: Any) -> dict[str, Any]:
        hello = newer_hello(session_id, *args)
        del hello[without]
        return hello

    monkeypatch.setattr(server.control, "server_hello", older_hello)


async def test_a_client_keeps_as_many_connections_as_it_was_told() -> None:
    async with running_world("pi", connections=3) as world:
        await wait_until(lambda: len(world.client.sessions) == 3)
        sessions = world.server.registry.clients()
        assert [(s.name, s.connection, s.connections) for s in sessions] == [
            ("pi", 0, 3),
            ("pi", 1, 3),
            ("pi", 2, 3),
        ]
        assert len({s.instance for s in sessions}) == 1


async def test_against_an_exit_server_that_keeps_one_connection_the_client_keeps_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # An older exit server says nothing of max_connections, and would let
    # each of the client's sessions replace the other.
    an_older_exit_server(monkeypatch, without="max_connections")
    with caplog.at_level(logging.WARNING, logger="homeport.client"):
        async with running_world("pi", connections=2) as world:
            await wait_until(lambda: "keeping 1 of --connections 2" in caplog.text)
            assert len(world.server.registry) == 1
            assert world.client.sessions_started == 1
            assert "replaced" not in caplog.text


async def test_a_client_warns_when_the_exit_server_will_not_send_its_proxy_protocol_header(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # An exit server from before --proxy-protocol ignores the client's ask and grants nothing.
    an_older_exit_server(monkeypatch, without="proxy_protocol")
    port = free_port()
    served = parse_upstreams((), tcp=(f"{port}=127.0.0.1:22",), proxy_protocol=(f"{port}=v2",))
    with caplog.at_level(logging.WARNING, logger="homeport.client"):
        async with running_world("pi", more_upstreams=served, tcp_ports=(port,)):
            await wait_until(lambda: f"PROXY protocol header on TCP port {port}" in caplog.text)


async def test_a_client_granted_its_proxy_protocol_header_does_not_warn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    served = parse_upstreams((), tcp=(f"{port}=127.0.0.1:22",), proxy_protocol=(f"{port}=v1",))
    with caplog.at_level(logging.WARNING, logger="homeport.client"):
        async with running_world("pi", more_upstreams=served, tcp_ports=(port,)) as world:
            (session,) = world.server.registry.clients()
            assert session.routes[f"tcp:{port}"].proxy_protocol == 1
    assert "PROXY" not in caplog.text


async def test_a_session_out_of_stream_ids_hands_over_and_finishes_what_it_carries(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO):
        async with running_world("pi") as world, aiohttp.ClientSession() as http:
            (first,) = world.server.registry.clients()
            first.session.mux._next_local_id = MAX_STREAM_ID - 1  # a billion streams on
            # /slow does not answer while its visitor waits: that exchange, on the
            # last stream id, is under way all through the handover.
            slow = asyncio.create_task(http.get(f"{world.public_url}/slow"))
            await wait_until(lambda: world.client.sessions_started == 2)
            await wait_until(lambda: world.server.registry.clients() not in ([], [first]))
            async with http.get(world.public_url) as response:
                assert response.status == 200
                assert await response.text() == "fine"
            assert first.session.end is None  # not replaced: still carrying /slow
            assert not slow.done()
            slow.cancel()  # the visitor leaves, and with its exchange the session's last
            async with asyncio.timeout(10):
                await first.session.wait_closed()
            assert first.session.end is not None
            assert first.session.end.code is ErrorCode.GOING_AWAY
            await wait_until(lambda: not world.client._draining)
    assert "the exit server sent this session away; opening the next" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
