"""What a finished request leaves behind on the exit server: nothing.

Each request's exchange ties itself into reference cycles while it runs (its
response parser holds its callbacks; the request points back at it; its
stream and it point at each other). When it ends those are broken, so
reference counting frees it at once: the cyclic garbage collector, whose full
collections stalled every visitor for tens of milliseconds under load, has
nothing per request to find. The same holds when the visitor leaves before
the answer, and for a pooled stream when it leaves the pool.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import aiohttp
import pytest

from client.forward import Forwarder
from server import registry
from server.proxy import Exchange, VisitorConnection, _ResponseReader
from tests.support.waiting import wait_until
from tests.support.world import running_world
from tunnel.session import Stream

REQUESTS = 200
VISITORS = 20
SETTLE_TIMEOUT_S = 10.0


@pytest.fixture
def collector_off() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def live(kind: type) -> int:
    """Objects of ``kind`` still allocated, reachable or not (the collector is off)."""
    return sum(1 for obj in gc.get_objects() if type(obj) is kind)


async def test_finished_exchanges_are_freed_without_the_cyclic_collector(
    collector_off: None,
) -> None:
    async with running_world() as world, aiohttp.ClientSession() as http:
        for _ in range(REQUESTS):
            async with http.get(world.public_url + "/") as response:
                assert response.status == 200
                assert await response.text() == "fine"
        assert live(Exchange) == 0


async def wait_none_live(kinds: tuple[type, ...]) -> None:
    """Wait until no object of ``kinds`` is left; say what is left if some stay."""
    try:
        await wait_until(lambda: not any(live(kind) for kind in kinds), SETTLE_TIMEOUT_S)
    except AssertionError:
        left = {kind.__name__: live(kind) for kind in kinds}
        pytest.fail(f"still allocated after {SETTLE_TIMEOUT_S} s: {left}")


async def test_exchanges_whose_visitors_left_are_freed_without_the_cyclic_collector(
    collector_off: None,
) -> None:
    async with running_world() as world:
        port = world.server.public_addresses[0][1]
        visitors = []
        for _ in range(VISITORS):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /slow HTTP/1.1\r\nHost: example.test\r\n\r\n")
            visitors.append((reader, writer))
        await wait_until(lambda: world.server.public.in_flight == VISITORS, SETTLE_TIMEOUT_S)
        assert live(Exchange) == VISITORS
        for _, writer in visitors:
            writer.close()
        # Each exchange resets its stream; the client drops its upstream connection.
        await wait_none_live((Exchange, VisitorConnection, Stream, Forwarder))


async def test_streams_leaving_the_pool_are_freed_without_the_cyclic_collector(
    collector_off: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Idle pooled streams retire at the first sweep instead of after seconds.
    monkeypatch.setattr(registry, "POOL_IDLE_TIMEOUT_S", 0.0)
    async with running_world() as world, aiohttp.ClientSession() as http:

        async def fetch() -> None:
            async with http.get(world.public_url + "/") as response:
                assert await response.text() == "fine"

        await asyncio.gather(*(fetch() for _ in range(VISITORS)))
        await wait_none_live((Exchange, Stream, _ResponseReader))
