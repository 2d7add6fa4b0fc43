"""The registry: which sessions replace which, and which session a request goes to."""

from __future__ import annotations

from typing import cast

import pytest

from server.registry import ConnectedClient, Registry, Route
from tests.support.channels import MemoryChannel
from tunnel.errors import ErrorCode, StreamClosed
from tunnel.mux import Multiplexer, Role, Settings
from tunnel.session import Session, Stream, StreamHandler


def connected(
    name: str = "pi",
    *,
    instance: str = "aaaa0000",
    connection: int = 0,
    connections: int = 1,
    max_streams: int = 100,
) -> ConnectedClient:
    return ConnectedClient(
        name=name,
        session=Session(MemoryChannel(), Multiplexer(Role.SERVER, Settings(), now=0.0)),
        routes={"": Route("")},
        remote_addr=f"127.0.0.1:{1000 + connection}",
        session_id=f"{instance}-{connection}",
        max_streams=max_streams,
        instance=instance,
        connection=connection,
        connections=connections,
    )


def two_connections(registry: Registry) -> tuple[ConnectedClient, ConnectedClient]:
    first = connected(connection=0, connections=2)
    second = connected(connection=1, connections=2)
    registry.add(first)
    registry.add(second)
    return first, second


def busy(client: ConnectedClient, streams: int) -> None:
    """Give the client's session ``streams`` open streams that carry an exchange.

    Stand-ins: the registry only counts them.
    """
    client.session.streams.clear()
    client.session.streams.update({n: cast(Stream, object()) for n in range(1, 2 * streams, 2)})


async def test_a_clients_connections_stand_side_by_side() -> None:
    registry = Registry()
    first = connected(connection=0, connections=2)
    second = connected(connection=1, connections=2)
    assert registry.add(first) == []
    assert registry.add(second) == []
    assert registry.clients() == [first, second]
    assert registry.get("pi", 1) is second


async def test_a_connection_replaces_the_ghost_with_its_number() -> None:
    registry = Registry()
    first, ghost = two_connections(registry)
    again = connected(connection=1, connections=2)
    assert registry.add(again) == [ghost]
    assert registry.clients() == [first, again]


async def test_a_new_run_of_the_client_replaces_every_session_of_the_old() -> None:
    registry = Registry()
    old = list(two_connections(registry))
    new = connected(instance="bbbb1111", connection=0, connections=1)
    assert registry.add(new) == old
    assert registry.clients() == [new]
    assert registry.lookup("anything.example") == (new, "")


async def test_other_clients_serving_the_same_host_are_not_replaced() -> None:
    registry = Registry()
    pi = connected("pi")
    other = connected("other", instance="cccc2222")
    registry.add(pi)
    assert registry.add(other) == []
    assert len(registry) == 2


async def test_a_request_goes_to_the_least_busy_session() -> None:
    registry = Registry()
    first, second = two_connections(registry)
    busy(first, 1)  # a download holds the first connection
    assert [registry.lookup(None) for _ in range(4)] == [(second, "")] * 4
    busy(second, 2)
    assert registry.lookup(None) == (first, "")


async def test_equally_busy_sessions_take_requests_in_turn() -> None:
    registry = Registry()
    sessions = [connected(connection=n, connections=3) for n in range(3)]
    for client in sessions:
        registry.add(client)
    chosen = [registry.lookup(None) for _ in range(6)]
    assert chosen == [(client, "") for client in sessions] * 2


async def test_pooled_streams_do_not_count_as_busy() -> None:
    registry = Registry()
    first, second = two_connections(registry)
    busy(first, 1)
    busy(second, 1)
    pooled = cast(Stream, object())
    second._idle[""] = {pooled: 0.0}  # its one stream waits in the pool
    assert second.busy_streams() == 0
    assert registry.lookup(None) == (second, "")


async def test_a_closing_session_gets_no_requests() -> None:
    registry = Registry()
    first, second = two_connections(registry)
    second.session.go_away()
    busy(first, 5)
    assert registry.lookup(None) == (first, "")
    registry.remove(second)
    registry.remove(first)
    assert registry.lookup(None) is None
    assert len(registry) == 0


async def test_a_clients_connections_share_its_stream_limit() -> None:
    registry = Registry()
    first = connected(connection=0, connections=2, max_streams=3)
    second = connected(connection=1, connections=2, max_streams=3)
    registry.add(first)
    registry.add(second)
    busy(first, 2)
    busy(second, 1)
    with pytest.raises(StreamClosed) as refused:
        second.acquire("", StreamHandler())
    assert refused.value.code is ErrorCode.REFUSED_STREAM
    registry.remove(first)  # its streams are no longer the client's
    assert second.open_streams() == 1
