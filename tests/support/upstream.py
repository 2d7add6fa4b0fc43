"""A real HTTP upstream for end-to-end tests, run as its own process.

    python -m tests.support.upstream [--port 0] [--name NAME]

prints ``upstream NAME listening on 127.0.0.1:PORT`` once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import struct
import sys

from aiohttp import web

CHUNK = 64 * 1024
_PATTERN = bytes((i * 7 + 3) % 251 for i in range(CHUNK))


def pattern_chunk(index: int, size: int = CHUNK) -> bytes:
    """Chunk ``index`` of the deterministic body: its index, then a fixed pattern.

    Numbering every chunk makes lost, duplicated or reordered chunks visible.
    """
    return (struct.pack(">Q", index) + _PATTERN[8:])[:size]


def pattern_body(length: int) -> bytes:
    return b"".join(
        pattern_chunk(i, min(CHUNK, length - i * CHUNK))
        for i in range((length + CHUNK - 1) // CHUNK)
    )


def pattern_sha256(length: int) -> str:
    digest = hashlib.sha256()
    for i in range((length + CHUNK - 1) // CHUNK):
        digest.update(pattern_chunk(i, min(CHUNK, length - i * CHUNK)))
    return digest.hexdigest()


def make_app(name: str) -> web.Application:
    async def index(request: web.Request) -> web.Response:
        return web.Response(text=f"hello from {name}\n")

    async def pattern(request: web.Request) -> web.StreamResponse:
        length = int(request.match_info["length"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = length
        await response.prepare(request)
        for i in range((length + CHUNK - 1) // CHUNK):
            await response.write(pattern_chunk(i, min(CHUNK, length - i * CHUNK)))
        await response.write_eof()
        return response

    async def sha256(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"sha256": digest.hexdigest(), "size": size})

    async def echo(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        async for chunk in request.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response

    async def headers(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "name": name,
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": [
                    [k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers
                ],
            }
        )

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("seconds", "1")))
        return web.Response(text="slow but done\n")

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="status\n")

    app = web.Application(client_max_size=1024**4)
    app.router.add_get("/", index)
    app.router.add_get("/pattern/{length:\\d+}", pattern)
    app.router.add_post("/sha256", sha256)
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/headers", headers)
    app.router.add_route("*", "/headers/{tail:.*}", headers)
    app.router.add_get("/slow", slow)
    app.router.add_get("/status/{code:\\d+}", status)
    return app


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="upstream")
    args = parser.parse_args()
    runner = web.AppRunner(make_app(args.name), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    port = runner.addresses[0][1]
    print(f"upstream {args.name} listening on 127.0.0.1:{port}", flush=True)  # noqa: T201
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
