"""The idle upstream: an SSE endpoint that answers with a head and one comment, then holds on.

Each visitor that reaches it is an open stream that carries nothing: what a
server-sent-events page or a long poll leaves open for minutes. The benchmark
opens thousands of them through one client and measures what each one costs
the exit server and the client in memory.

Any request but ``GET /count`` gets ``200``, ``Content-Type:
text/event-stream``, a chunked body whose first chunk is the comment
``: open``, and then nothing until the visitor goes away (EOF), when the
connection is closed. ``GET /count`` answers ``{"open": N, "opened": M}``: the
streams open now and since the start, so that the benchmark can check from the
far end that a tunnel really carries (and then really closes) them.
``GET /heartbeat`` sends the comment ``: ping`` down every open stream, as SSE
servers do every so often to keep proxies from timing out: a proxy that has
not noticed its visitor leaving finds out when it writes to it.

Run as ``python -m bench.idle_upstream --port PORT`` (127.0.0.1 only); the
benchmark starts it as a child and ends it by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import resource
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from bench.errors import BenchError
from bench.processes import LOOPBACK, Child, free_port, http_get, running, wait_until

COUNT_PATH: Final = "/count"
HEARTBEAT_PATH: Final = "/heartbeat"
FIRST_EVENT: Final = b": open\n\n"
HEARTBEAT_EVENT: Final = b": ping\n\n"
READY_TIMEOUT_S: Final = 10.0
_BACKLOG: Final = 4096
_HEAD_LIMIT_BYTES: Final = 16 * 1024
_READ_BYTES: Final = 4096
_STREAM_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
)


@dataclass
class _Streams:
    open: set[asyncio.StreamWriter] = field(default_factory=set)
    opened: int = 0


def _chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def _json_answer(data: dict[str, int]) -> bytes:
    """A whole ``200`` answer carrying ``data`` as JSON, closing the connection."""
    body = json.dumps(data).encode()
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )


async def _serve(port: int) -> None:
    """Accept visitors on 127.0.0.1:``port`` until the process is ended."""
    streams = _Streams()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(f"GET {COUNT_PATH} ".encode()):
                writer.write(_json_answer({"open": len(streams.open), "opened": streams.opened}))
                await writer.drain()
                return
            if head.startswith(f"GET {HEARTBEAT_PATH} ".encode()):
                for stream in streams.open:
                    stream.write(_chunk(HEARTBEAT_EVENT))
                writer.write(_json_answer({"sent": len(streams.open)}))
                await writer.drain()
                return
            streams.open.add(writer)
            streams.opened += 1
            try:
                writer.write(_STREAM_HEAD + _chunk(FIRST_EVENT))
                while await reader.read(_READ_BYTES):  # until the visitor goes away
                    pass
            finally:
                streams.open.discard(writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the visitor went away; nothing to report
        finally:
            writer.close()

    server = await asyncio.start_server(
        handle, LOOPBACK, port, backlog=_BACKLOG, limit=_HEAD_LIMIT_BYTES
    )
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    """Serve idle streams on the port given on the command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.idle_upstream")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # one socket per stream; the benchmark has raised the hard limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port))
    return 0


@dataclass(frozen=True)
class IdleUpstream:
    """The running idle upstream."""

    port: int
    process: Child

    @property
    def url(self) -> str:
        """Its base URL, as a client route or an ``ssh -R`` target names it."""
        return f"http://{LOOPBACK}:{self.port}"

    def open_streams(self) -> int:
        """How many visitors it holds open now.

        Raises:
            BenchError: it has exited or did not answer ``GET /count``.
        """
        return self._get(COUNT_PATH, "open")

    def send_heartbeat(self) -> int:
        """Send ``: ping`` down every open stream; return how many got it.

        Raises:
            BenchError: it has exited or did not answer ``GET /heartbeat``.
        """
        return self._get(HEARTBEAT_PATH, "sent")

    def _get(self, path: str, key: str) -> int:
        """GET ``path`` and return the number under ``key`` in its JSON answer."""
        self.process.check_running()
        try:
            status, body = http_get(self.port, path)
            number = json.loads(body)[key]
        except (OSError, ValueError, KeyError, http.client.HTTPException) as exc:
            raise BenchError(f"GET {path} on the idle upstream failed: {exc}") from None
        if status != 200 or not isinstance(number, int):
            raise BenchError(f"GET {path} on the idle upstream answered {status}")
        return number


@contextlib.contextmanager
def run_idle_upstream(workdir: Path, repo_root: Path) -> Iterator[IdleUpstream]:
    """Run the idle upstream on a free port; stop it on the way out.

    Raises:
        BenchError: it exited or did not answer within ``READY_TIMEOUT_S``.
    """
    port = free_port()
    args = [sys.executable, "-m", "bench.idle_upstream", f"--port={port}"]
    child = Child("idle upstream", args, workdir / "idle-upstream.log", cwd=repo_root)
    with running(child) as process:
        upstream = IdleUpstream(port, process)

        def answers() -> bool:
            process.check_running()
            try:
                return http_get(port, COUNT_PATH)[0] == 200
            except (OSError, http.client.HTTPException):
                return False

        wait_until(answers, READY_TIMEOUT_S, f"the idle upstream answering on port {port}")
        yield upstream


if __name__ == "__main__":
    raise SystemExit(main())
