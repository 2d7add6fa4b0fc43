"""An exit server, a client and an aiohttp upstream, all in this process.

For tests that look inside the exit server (its registry, its objects) or
need many examples quickly; the end-to-end suites run the real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from client.app import TunnelClient
from client.config import ClientConfig
from client.upstreams import Upstream, parse_upstream
from server.app import ExitServer
from server.config import ServerConfig
from tunnel.auth import generate_token, token_digest

TOKEN = generate_token()
CONNECT_TIMEOUT_S = 10.0
#: ``/slow`` waits up to a minute, looking every SLOW_POLL_S for its visitor gone.
SLOW_POLL_S = 0.01
SLOW_POLLS = 6000


@dataclass
class World:
    server: ExitServer
    client: TunnelClient

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.server.public_addresses[0][1]}"

    @property
    def control_url(self) -> str:
        return f"ws://127.0.0.1:{self.server.control_addresses[0][1]}"


async def _fine(_request: web.Request) -> web.Response:
    return web.Response(text="fine")


async def _chunked(_request: web.Request) -> web.StreamResponse:
    """Three chunks, the last a moment after the others."""
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(_request)
    await response.write(b"one ")
    await response.write(b"two ")
    await asyncio.sleep(0.05)
    await response.write(b"three")
    await response.write_eof()
    return response


async def _slow(request: web.Request) -> web.Response:
    """An answer that takes longer than any test waits: visitors leave first.

    It gives up once the client has dropped the upstream connection, polling
    for that, so the runner's cleanup does not wait for it.
    """
    for _ in range(SLOW_POLLS):
        transport = request.transport
        if transport is None or transport.is_closing():
            break
        await asyncio.sleep(SLOW_POLL_S)
    return web.Response(text="too late")


async def _empty(_request: web.Request) -> web.Response:
    return web.Response(status=204)


async def _late_body(_request: web.Request) -> web.StreamResponse:
    """A Content-Length response whose body follows its head a moment later."""
    response = web.StreamResponse()
    response.content_length = 4
    await response.prepare(_request)
    await asyncio.sleep(0.05)
    await response.write(b"late")
    await response.write_eof()
    return response


@contextlib.asynccontextmanager
async def running_world(
    client_name: str = "honest",
    connections: int = 1,
    more_upstreams: tuple[Upstream, ...] = (),
    **server_settings: object,
) -> AsyncIterator[World]:
    """Serve ``GET /`` ("fine") through a tunnel; stop everything on the way out.

    ``server_settings`` are fields of the exit server's :class:`ServerConfig`;
    ``more_upstreams`` are served by the client beside that default route.
    Also ``/chunked`` ("one two three" in chunks), ``/empty`` (204),
    ``/late`` ("late", its body a moment after its head) and ``/slow`` (no
    answer for a minute).
    """
    app = web.Application()
    app.router.add_get("/", _fine)
    app.router.add_get("/chunked", _chunked)
    app.router.add_get("/empty", _empty)
    app.router.add_get("/late", _late_body)
    app.router.add_get("/slow", _slow)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        upstream_port = runner.addresses[0][1]
        server = ExitServer(
            ServerConfig(
                token_digest(TOKEN),
                bind="127.0.0.1",
                port=0,
                control_port=0,
                max_auth_failures=10_000,
                **server_settings,  # type: ignore[arg-type]
            )
        )
        await server.start()
        try:
            client = TunnelClient(ClientConfig(
                url=f"ws://127.0.0.1:{server.control_addresses[0][1]}", token=TOKEN,
                upstreams=(parse_upstream(f"http://127.0.0.1:{upstream_port}"), *more_upstreams),
                name=client_name, connections=connections,
            ))  # fmt: skip
            task = asyncio.create_task(client.run())
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await client.wait_connected()
                yield World(server, client)
            finally:
                client.stop()
                await task
        finally:
            await server.shutdown()
    finally:
        await runner.cleanup()
