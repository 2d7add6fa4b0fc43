"""A client's several connections (``--connections``), against exit servers new and old."""

from __future__ import annotations

import logging
from typing import Any

import pytest

import server.control
from tests.support.waiting import wait_until
from tests.support.world import running_world


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
    newer_hello = server.control.server_hello

    def older_hello(session_id: str) -> dict[str, Any]:
        hello = newer_hello(session_id)
        del hello["max_connections"]
        return hello

    monkeypatch.setattr(server.control, "server_hello", older_hello)
    with caplog.at_level(logging.WARNING, logger="homeport.client"):
        async with running_world("pi", connections=2) as world:
            await wait_until(lambda: "keeping 1 of --connections 2" in caplog.text)
            assert len(world.server.registry) == 1
            assert world.client.sessions_started == 1
            assert "replaced" not in caplog.text
