"""A pooled stream keeps its response parser from one exchange to the next.

Making llhttp's parser binds each of its callbacks anew, the costliest thing
the exit server did per request; a stream's next exchange reuses the one its
last exchange read with, but only when llhttp read that response to its end
and so waits at the start of the next one.
"""

from __future__ import annotations

import aiohttp

from tests.support.world import World, running_world


def pooled_parsers(world: World) -> list[object]:
    """What each pooled stream keeps for its next exchange (its response reader, or None)."""
    client = world.server.registry.get("honest")
    assert client is not None
    return [stream.handler.kept for idle in client._idle.values() for stream in idle]  # type: ignore[attr-defined]


async def test_one_parser_reads_every_response_of_a_pooled_stream() -> None:
    async with running_world() as world, aiohttp.ClientSession() as http:
        seen = []
        # Sequential requests on one keep-alive visitor connection: one pooled stream.
        for path, body in [
            ("/", "fine"),
            ("/chunked", "one two three"),
            ("/empty", ""),
            ("/", "fine"),
            ("/chunked", "one two three"),
        ]:
            async with http.get(world.public_url + path) as response:
                assert await response.text() == body
                assert response.status == (204 if path == "/empty" else 200)
            seen.append(pooled_parsers(world))
        assert len(seen[0]) == 1
        assert seen[0][0] is not None
        assert all(parsers == seen[0] for parsers in seen)  # the same reader, every time


async def test_a_parser_that_did_not_read_the_whole_body_is_not_kept() -> None:
    # /late's body comes after its head: it passes to the visitor without
    # llhttp, whose parser still expects it and must not read the next response.
    async with running_world() as world, aiohttp.ClientSession() as http:
        async with http.get(world.public_url + "/") as response:
            assert await response.text() == "fine"
        [first] = pooled_parsers(world)
        async with http.get(world.public_url + "/late") as response:
            assert await response.text() == "late"
        assert pooled_parsers(world) == [None]
        for _ in range(3):
            async with http.get(world.public_url + "/") as response:
                assert await response.text() == "fine"
        [fresh] = pooled_parsers(world)
        assert fresh is not None
        assert fresh is not first
