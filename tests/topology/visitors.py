"""Visitors at a steady rate, whatever happens to the tunnel: a load and a probe in one.

    python -m tests.topology.visitors URL --rate 5 --duration 30 [--timeout 20] [--method POST]

starts one request every ``1/rate`` seconds for ``duration`` seconds, each on
its own connection, without waiting for earlier ones (an open loop, as real
visitors behave), then waits for the last to finish or time out. ``{id}``
in the URL becomes the request's id (``v0``, ``v1``, … with ``--prefix v``), which a POST also
sends as its body. It prints one JSON line per request, with CLOCK_MONOTONIC
times that the test can compare with its own::

    {"id": "v7", "start": 123.4, "end": 123.5, "status": 200, "error": "", "body": "…"}

``status`` is 0 when no HTTP answer came (refused, reset, timed out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aiohttp

BODY_CHARS = 200


def say(line: str) -> None:
    print(line, flush=True)  # noqa: T201 - the test reads these lines


async def visit(
    http: aiohttp.ClientSession, method: str, url: str, request_id: str, timeout_s: float
) -> None:
    start = time.monotonic()
    status, error, body = 0, "", ""
    data = request_id.encode() if method == "POST" else None
    try:
        async with (
            asyncio.timeout(timeout_s),
            http.request(method, url.format(id=request_id), data=data) as response,
        ):
            status = response.status
            body = (await response.read())[:BODY_CHARS].decode("utf-8", "replace")
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:BODY_CHARS]
    record = {
        "id": request_id,
        "start": start,
        "end": time.monotonic(),
        "status": status,
        "error": error,
        "body": body,
    }
    say(json.dumps(record))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, default=5.0, help="requests started per second")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--prefix", default="v", help="what request ids start with")
    args = parser.parse_args()

    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        say("visitors started")
        loop = asyncio.get_running_loop()
        began = loop.time()
        count = int(args.rate * args.duration)
        async with asyncio.TaskGroup() as visits:
            for n in range(count):
                await asyncio.sleep(max(0.0, began + n / args.rate - loop.time()))
                visits.create_task(
                    visit(http, args.method, args.url, f"{args.prefix}{n}", args.timeout)
                )
        say(f"visitors finished: {count} requests")


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
