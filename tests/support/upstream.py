"""A real HTTP upstream for end-to-end tests, run as its own process.

    python -m tests.support.upstream [--port 0] [--name NAME]

prints ``upstream NAME listening on 127.0.0.1:PORT`` once it serves, and a
line for the events tests wait on (a download abandoned by its visitor).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import os
import struct
import sys
import tempfile
from pathlib import Path

from aiohttp import WSMsgType, web

CHUNK = 64 * 1024
_PATTERN = bytes((i * 7 + 3) % 251 for i in range(CHUNK))
FILE_BYTES = 300_000
GZIP_TEXT = b"compressed on purpose, and passed on as it is\n" * 50


def pattern_chunk(index: int, size: int = CHUNK) -> bytes:
    """Chunk ``index`` of the deterministic body: its index, then a fixed pattern.

    Numbering every chunk makes lost, duplicated or reordered chunks visible.
    """
    return (struct.pack(">Q", index) + _PATTERN[8:])[:size]


def _chunks(length: int) -> list[int]:
    return [min(CHUNK, length - i * CHUNK) for i in range((length + CHUNK - 1) // CHUNK)]


def pattern_body(length: int) -> bytes:
    return b"".join(pattern_chunk(i, size) for i, size in enumerate(_chunks(length)))


def pattern_sha256(length: int) -> str:
    digest = hashlib.sha256()
    for i, size in enumerate(_chunks(length)):
        digest.update(pattern_chunk(i, size))
    return digest.hexdigest()


def file_body() -> bytes:
    return bytes((i * 13 + 5) % 256 for i in range(FILE_BYTES))


def say(line: str) -> None:
    print(line, flush=True)  # noqa: T201 - tests wait on these lines


def make_app(name: str, files: Path) -> web.Application:
    async def index(request: web.Request) -> web.Response:
        return web.Response(text=f"hello from {name}\n")

    async def pattern(request: web.Request) -> web.StreamResponse:
        length = int(request.match_info["length"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = length
        await response.prepare(request)
        sent = 0
        try:
            for i, size in enumerate(_chunks(length)):
                await response.write(pattern_chunk(i, size))
                sent += size
        except (ConnectionResetError, ConnectionError):
            say(f"upstream {name}: download aborted after {sent} bytes")
            raise
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

    async def inspect(request: web.Request) -> web.Response:
        """What the upstream received, exactly: for comparing direct and tunnelled requests."""
        body = await request.read()
        return web.json_response(
            {
                "name": name,
                "method": request.method,
                "raw_path": request.raw_path,
                "version": f"{request.version.major}.{request.version.minor}",
                "headers": [
                    [k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers
                ],
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "body_length": len(body),
            },
            headers={"X-Echo-Method": request.method},
        )

    async def cookies(request: web.Request) -> web.Response:
        response = web.Response(text="two cookies\n")
        response.headers.add("Set-Cookie", "a=1; Path=/; HttpOnly")
        response.headers.add("Set-Cookie", "b=2; Path=/; Max-Age=60")
        response.headers.add("X-Foo", "first")
        response.headers.add("X-Foo", "second, with comma")
        response.headers.add("x-MiXeD-CaSe", "Value Exactly")
        return response

    async def gzipped(request: web.Request) -> web.Response:
        body = gzip.compress(GZIP_TEXT, mtime=0)
        return web.Response(
            body=body,
            headers={
                "Content-Encoding": "gzip",
                "Content-Type": "text/plain",
                "Vary": "Accept-Encoding",
            },
        )

    async def brotli_labelled(request: web.Request) -> web.Response:
        return web.Response(
            body=b"\x8b\x03\x80opaque br bytes\x03", headers={"Content-Encoding": "br"}
        )

    async def status(request: web.Request) -> web.StreamResponse:
        code = int(request.match_info["code"])
        if code in (204, 304):
            return web.Response(status=code, headers={"ETag": '"v1"'})
        return web.Response(status=code, text=f"status {code}\n")

    async def sse(request: web.Request) -> web.StreamResponse:
        count = int(request.query.get("n", "5"))
        interval = float(request.query.get("interval", "0.3"))
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        for n in range(count):
            await response.write(f"id: {n}\nevent: tick\ndata: event {n}\n\n".encode())
            await asyncio.sleep(interval)
        await response.write_eof()
        return response

    async def chunked(request: web.Request) -> web.StreamResponse:
        count = int(request.query.get("n", "5"))
        interval = float(request.query.get("interval", "0"))
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for n in range(count):
            await response.write(b"piece %d\n" % n)
            if interval:
                await asyncio.sleep(interval)
        await response.write_eof()
        return response

    async def slow(request: web.Request) -> web.Response:
        seconds = float(request.query.get("seconds", "1"))
        say(f"upstream {name}: answering in {seconds} s")
        await asyncio.sleep(seconds)
        return web.Response(text="slow but done\n")

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("chat", "superchat"), max_msg_size=8 * 1024 * 1024)
        await ws.prepare(request)
        muted = False  # "mute": take messages without answering, until "unmute"
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                if message.data.startswith("close:"):
                    _, code, reason = message.data.split(":", 2)
                    await ws.close(code=int(code), message=reason.encode())
                    break
                if message.data.startswith("ticks:"):  # "ticks:COUNT:SECONDS" apart
                    _, count, seconds = message.data.split(":")
                    for n in range(int(count)):
                        await asyncio.sleep(float(seconds))
                        await ws.send_str(f"tick {n}")
                    continue
                if message.data in ("mute", "unmute"):
                    muted = message.data == "mute"
                    continue
                if not muted:
                    await ws.send_str(message.data)
            elif message.type == WSMsgType.BINARY and not muted:
                await ws.send_bytes(message.data)
        say(f"upstream {name}: websocket closed with {ws.close_code}")
        return ws

    async def basic(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Basic YWRtaW46c2VjcmV0":  # admin:secret
            return web.Response(
                status=401,
                text="unauthorized\n",
                headers={"WWW-Authenticate": 'Basic realm="faasd"'},
            )
        return web.json_response([{"name": "figlet", "replicas": 1}])

    app = web.Application(client_max_size=1024**4)
    routes = app.router
    routes.add_get("/", index)
    routes.add_get("/pattern/{length:\\d+}", pattern)
    routes.add_post("/sha256", sha256)
    routes.add_route("*", "/echo", echo)
    routes.add_route("*", "/headers", inspect)
    routes.add_route("*", "/inspect", inspect)
    routes.add_route("*", "/inspect/{tail:.*}", inspect)
    routes.add_get("/cookies", cookies)
    routes.add_get("/gzip", gzipped)
    routes.add_get("/br", brotli_labelled)
    routes.add_route("*", "/status/{code:\\d+}", status)
    routes.add_get("/sse", sse)
    routes.add_get("/chunked", chunked)
    routes.add_get("/slow", slow)
    routes.add_get("/ws", websocket)
    routes.add_get("/system/functions", basic)
    routes.add_static("/files", files)
    return app


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="upstream")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        files = Path(directory)
        (files / "data.bin").write_bytes(file_body())
        os.utime(files / "data.bin", (1_700_000_000, 1_700_000_000))
        runner = web.AppRunner(make_app(args.name, files), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", args.port)
        await site.start()
        port = runner.addresses[0][1]
        say(f"upstream {args.name} listening on 127.0.0.1:{port}")
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
