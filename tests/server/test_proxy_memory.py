"""What a finished request leaves behind on the exit server: nothing.

Each request's exchange ties itself into reference cycles while it runs (its
response parser holds its callbacks; the request points back at it). When it
ends those are broken, so reference counting frees it at once: the cyclic
garbage collector, whose full collections stalled every visitor for tens of
milliseconds under load, has nothing per request to find.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import aiohttp
import pytest

from server.proxy import Exchange
from tests.support.world import running_world

REQUESTS = 200


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


def live_exchanges() -> int:
    """Exchanges still allocated, reachable or not (the collector is off)."""
    return sum(1 for obj in gc.get_objects() if type(obj) is Exchange)


async def test_finished_exchanges_are_freed_without_the_cyclic_collector(
    collector_off: None,
) -> None:
    async with running_world() as world, aiohttp.ClientSession() as http:
        for _ in range(REQUESTS):
            async with http.get(world.public_url + "/") as response:
                assert response.status == 200
                assert await response.text() == "fine"
        assert live_exchanges() == 0
