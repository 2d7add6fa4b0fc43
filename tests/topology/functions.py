"""A small faasd-like function gateway, run on the Pi of the test bed.

    python -m tests.topology.functions [--port 8081]

It answers as an OpenFaaS gateway does, for the paths a tunnel must carry:

- ``POST /function/NAME`` runs a function on the body and answers with its
  output (``GET`` works too, as in OpenFaaS);
- ``POST /async-function/NAME`` answers ``202 Accepted`` at once with an
  ``X-Call-Id`` and runs the function afterwards;
- ``GET /system/functions`` lists the functions, behind basic auth
  (``admin:secret``, faasd's ``basic-auth-user``/``-password``);
- ``GET /function/ticks?ms=N`` is an event stream: ``data: tick`` every
  0.5 s for N milliseconds;
- ``GET /ws`` is a WebSocket echo, for the browser page of the bed's site.

Every invocation prints ``invoked NAME id=ID`` (the ``id`` query parameter,
else ``-``) and every finished asynchronous call ``async NAME call_id=ID
done: OUTPUT``: the tests count these lines to prove that no request reached
the function twice.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import sys
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable

from aiohttp import WSMsgType, web

TICK_MS = 500
BASIC_AUTH_USER = "admin"
BASIC_AUTH_PASSWORD = "secret"  # the test bed's faasd password
_EXPECTED_AUTH = (
    "Basic " + base64.b64encode(f"{BASIC_AUTH_USER}:{BASIC_AUTH_PASSWORD}".encode()).decode()
)


def say(line: str) -> None:
    print(line, flush=True)  # noqa: T201 - the tests wait on and count these lines


async def hello(body: bytes, request: web.Request) -> bytes:
    return b"Hello, " + (body.strip() or b"world") + b"!"


async def sha256(body: bytes, request: web.Request) -> bytes:
    return json.dumps({"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}).encode()


async def record(body: bytes, request: web.Request) -> bytes:
    """Take ``ms`` milliseconds, then name the call: a slow function that is easy to count."""
    await asyncio.sleep(int(request.query.get("ms", "0")) / 1000)
    return f"done {request.query.get('id', '-')}".encode()


FUNCTIONS: dict[str, Callable[[bytes, web.Request], Awaitable[bytes]]] = {
    "hello": hello,
    "sha256": sha256,
    "record": record,
}


def make_app() -> web.Application:
    invocations: Counter[str] = Counter()
    background: set[asyncio.Task[None]] = set()

    def lookup(request: web.Request) -> Callable[[bytes, web.Request], Awaitable[bytes]]:
        name = request.match_info["name"]
        function = FUNCTIONS.get(name)
        if function is None:
            raise web.HTTPNotFound(text=f"error finding function {name}\n")
        invocations[name] += 1
        say(f"invoked {name} id={request.query.get('id', '-')}")
        return function

    async def invoke(request: web.Request) -> web.Response:
        function = lookup(request)
        output = await function(await request.read(), request)
        return web.Response(body=output, headers={"X-Function": request.match_info["name"]})

    async def invoke_async(request: web.Request) -> web.Response:
        function = lookup(request)
        body = await request.read()
        call_id = str(uuid.uuid4())

        async def run_later() -> None:
            output = await function(body, request)
            say(f"async {request.match_info['name']} call_id={call_id} done: {output.decode()}")

        task = asyncio.create_task(run_later())
        background.add(task)
        task.add_done_callback(background.discard)
        return web.Response(status=202, headers={"X-Call-Id": call_id})

    async def list_functions(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != _EXPECTED_AUTH:
            return web.Response(
                status=401,
                text="Unauthorized\n",
                headers={"WWW-Authenticate": 'Basic realm="Restricted"'},
            )
        return web.json_response(
            [
                {"name": name, "replicas": 1, "invocationCount": invocations[name]}
                for name in FUNCTIONS
            ]
        )

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str(f"echo: {message.data}")
        return ws

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def ticks(request: web.Request) -> web.StreamResponse:
        say(f"invoked ticks id={request.query.get('id', '-')}")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(int(request.query.get("ms", "0")) // TICK_MS):
            await response.write(b"data: tick\n\n")
            await asyncio.sleep(TICK_MS / 1000)
        await response.write_eof()
        return response

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/function/ticks", ticks)
    app.router.add_route("*", "/function/{name}", invoke)
    app.router.add_post("/async-function/{name}", invoke_async)
    app.router.add_get("/system/functions", list_functions)
    app.router.add_get("/ws", echo)
    app.router.add_get("/healthz", health)
    return app


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args()
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "0.0.0.0", args.port)  # all interfaces: a LAN service, as faasd is
    await site.start()
    say(f"functions listening on 0.0.0.0:{args.port}")
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
