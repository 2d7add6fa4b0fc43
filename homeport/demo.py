"""``homeport demo``: the whole tunnel on loopback, with a sample upstream to browse.

The three parts run in one process here, but they talk exactly as they would
across the internet: the client dials the exit server's control port over a
websocket, and every visitor request crosses it as a stream.
"""

from __future__ import annotations

import asyncio
import html
import signal
import time

from aiohttp import web

from client.app import TunnelClient
from client.config import ClientConfig
from client.upstreams import parse_upstream
from server.app import ExitServer, format_address
from server.config import ServerConfig
from tunnel.auth import generate_token, token_digest
from tunnel.log import add_secrets

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>homeport demo</title>
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; max-width: 42rem;
       margin: 3rem auto; padding: 0 1rem; }}
code {{ background: #f2f2f2; padding: 0 .25rem; }}
td {{ padding: .15rem .75rem .15rem 0; vertical-align: top; }}
</style></head>
<body>
<h1>It works: this page came through the homeport tunnel.</h1>
<p>The sample upstream on <code>{upstream}</code> made this page. Your browser asked the
exit server, which carried the request over the client's websocket to the client,
which forwarded it to the upstream.</p>
<table>
<tr><td>method</td><td><code>{method}</code></td></tr>
<tr><td>path</td><td><code>{path}</code></td></tr>
<tr><td>X-Forwarded-For</td><td><code>{forwarded_for}</code></td></tr>
<tr><td>X-Forwarded-Host</td><td><code>{forwarded_host}</code></td></tr>
<tr><td>served at</td><td><code>{now}</code></td></tr>
</table>
<p>Try <code>curl -d 'hello' {public}echo</code> too.</p>
</body></html>
"""


def sample_app(upstream: str, public: str) -> web.Application:
    async def index(request: web.Request) -> web.Response:
        page = _PAGE.format(
            upstream=html.escape(upstream),
            method=html.escape(request.method),
            path=html.escape(request.raw_path),
            forwarded_for=html.escape(request.headers.get("X-Forwarded-For", "-")),
            forwarded_host=html.escape(request.headers.get("X-Forwarded-Host", "-")),
            now=time.strftime("%Y-%m-%d %H:%M:%S"),
            public=html.escape(public),
        )
        return web.Response(text=page, content_type="text/html")

    async def echo(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_type = request.content_type or "application/octet-stream"
        await response.prepare(request)
        async for chunk in request.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_route("*", "/echo", echo)
    return app


async def run_demo(*, port: int, control_port: int) -> None:
    """Run until Ctrl-C; then stop the client, the server and the upstream, in that order."""
    token = generate_token()
    add_secrets(token)
    exit_server = ExitServer(
        ServerConfig(
            token_digest=token_digest(token), bind="127.0.0.1", port=port, control_port=control_port
        )
    )
    await exit_server.start()
    public = f"http://{format_address(exit_server.public_addresses[0])}/"
    control = format_address(exit_server.control_addresses[0])

    runner = web.AppRunner(sample_app("127.0.0.1", public), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream_port = runner.addresses[0][1]
    upstream = f"http://127.0.0.1:{upstream_port}"

    tunnel_client = TunnelClient(
        ClientConfig(
            url=f"ws://{control}",
            token=token,
            upstreams=(parse_upstream(upstream),),
            name="demo",
        )
    )
    client_task = asyncio.create_task(tunnel_client.run(), name="demo-client")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with asyncio.timeout(15):
            await tunnel_client.wait_connected()
        print(  # noqa: T201 - the demo's one message to its user
            f"\n  homeport demo is running.\n\n"
            f"  Open {public} in a browser (or: curl {public}).\n"
            f"  visitor -> exit server {public} -> client 'demo' -> upstream {upstream}\n\n"
            f"  Press Ctrl-C to stop.\n",
            flush=True,
        )
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        tunnel_client.stop()
        await client_task
        await exit_server.shutdown()
        await runner.cleanup()
