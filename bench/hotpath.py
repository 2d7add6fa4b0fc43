"""``python -m bench.hotpath``: the tunnel's Python per request, with no sockets.

The end-to-end figures of ``make bench`` swing by 10-15 % from run to run on
a shared VM, more than most single changes to the hot path are worth. This
measures what those changes touch, and only that: the exit server's visitor
connections, exchanges, access log and session, and the client's session,
all real, in one process, joined by an in-memory channel instead of a
websocket. Visitors are fake transports sending ``GET /1k`` kept alive, as
wrk does; the client's side answers each request at once with the head and
the 1 KiB body nginx sends, as its upstream would. Nothing is read from or
written to the kernel, so the time is the Python's (and llhttp's).

It prints the CPU per request of each side, best and median of several
rounds; the client's share is what its session does (its forwarder's
sockets are left out). Even the best round moves by a few per cent with the
machine's neighbours, so ``--instructions`` counts instructions per request
with valgrind instead, a figure that repeats to 0.2 %: the one to compare a
change with. ``--profile`` shows where the calls go (cProfile: its overhead
is per call, so read counts, not times).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any, Final

from bench.errors import BenchError, run_command
from bench.tools import Tool, find_tool, install
from server.config import ServerConfig
from server.proxy import PublicServer, VisitorConnection
from server.registry import DEFAULT_ROUTE, ConnectedClient, Registry, Route
from tunnel.auth import generate_token, token_digest
from tunnel.errors import ErrorCode
from tunnel.mux import Multiplexer, Role, Settings
from tunnel.session import Session, Stream, StreamHandler
from tunnel.websocket import MessageHandler

BODY = b"x" * 1024
#: What nginx answers for /1k (bench/upstream.py), headers as nginx sends them.
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: nginx/1.22.1\r\n"
    b"Date: Thu, 26 Nov 2026 08:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Content-Length: 1024\r\n"
    b"Last-Modified: Thu, 26 Nov 2026 07:00:00 GMT\r\n"
    b"Connection: keep-alive\r\n"
    b'ETag: "6745f0c0-400"\r\n'
    b"Accept-Ranges: bytes\r\n"
    b"\r\n" + BODY
)
#: What the visitor gets: the same, less the hop-by-hop Connection header.
ANSWER_BYTES = len(RESPONSE) - len(b"Connection: keep-alive\r\n")
#: Requests of the two runs under valgrind (count_instructions).
INSTRUCTION_RUNS: Final = (1_000, 5_000)
#: What wrk sends.
REQUEST = b"GET /1k HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n"


class _Channel:
    """One end of an in-memory channel: a message arrives on the next loop iteration."""

    paused = False

    def __init__(self) -> None:
        self.handler: MessageHandler | None = None
        self.peer: _Channel | None = None
        self._loop = asyncio.get_running_loop()

    def send_message(self, parts: Sequence[bytes | memoryview]) -> None:
        assert self.peer is not None
        self._loop.call_soon(self.peer._deliver, b"".join(parts))

    def _deliver(self, message: bytes) -> None:
        if self.handler is not None:
            self.handler.message_received(message)

    def close(self, code: ErrorCode, reason: str) -> None:
        pass

    def abort(self) -> None:
        pass

    async def wait_closed(self) -> None:
        pass


class _Clock:
    """CPU time spent inside the wrapped calls (the client's share)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, function: Any) -> Any:
        def timed(*args: Any) -> Any:
            started = time.process_time()
            try:
                return function(*args)
            finally:
                self.seconds += time.process_time() - started

        return timed


class _Upstream(StreamHandler):
    """The client's side of a stream: answers each request head at once, as nginx would."""

    __slots__ = ("stream",)

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def data_received(self, data: bytes | memoryview) -> None:
        self.stream.write(RESPONSE)


class _Visitor:
    """A fake transport for one visitor connection: sends the next request on each response."""

    def __init__(self, bench: _Bench) -> None:
        self.bench = bench
        self.protocol = VisitorConnection(bench.public)
        self.received = 0
        self.protocol.connection_made(self)  # type: ignore[arg-type]

    def send(self) -> None:
        self.received = 0
        self.protocol.data_received(REQUEST)

    def write(self, data: bytes | memoryview) -> None:
        self._got(len(data))

    def writelines(self, parts: Sequence[bytes | memoryview]) -> None:
        if self.received == 0 and not bytes(parts[0]).startswith(b"HTTP/1.1 200 OK\r\n"):
            raise RuntimeError(f"unexpected answer {bytes(parts[0][:40])!r}")
        self._got(sum(map(len, parts)))

    def write_eof(self) -> None:
        raise RuntimeError("the exit server closed a kept-alive visitor connection")

    def _got(self, size: int) -> None:
        self.received += size
        if self.received == ANSWER_BYTES:
            self.bench.answered(self)
        elif self.received > ANSWER_BYTES:
            raise RuntimeError(f"{self.received} bytes answered, {ANSWER_BYTES} expected")

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )

    def is_closing(self) -> bool:
        return False

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class _Bench:
    def __init__(self, public: PublicServer, connections: int) -> None:
        self.public = public
        self.left = 0
        self.done: asyncio.Future[None] | None = None
        self.visitors = [_Visitor(self) for _ in range(connections)]

    def answered(self, visitor: _Visitor) -> None:
        self.left -= 1
        if self.left >= len(self.visitors):
            asyncio.get_running_loop().call_soon(visitor.send)
        elif self.left == 0 and self.done is not None:
            self.done.set_result(None)

    async def run(self, requests: int) -> None:
        self.left = requests
        self.done = asyncio.get_running_loop().create_future()
        for visitor in self.visitors:
            visitor.send()
        await self.done


async def _sessions() -> tuple[Session, Session, list[asyncio.Task[Any]]]:
    loop = asyncio.get_running_loop()
    client_end, server_end = _Channel(), _Channel()
    client_end.peer, server_end.peer = server_end, client_end
    client = Session(
        client_end,
        Multiplexer(Role.CLIENT, Settings(), now=loop.time()),
        name="bench",
        accept_stream=_Upstream,
    )
    server = Session(
        server_end,
        Multiplexer(Role.SERVER, Settings(max_concurrent_streams=0), now=loop.time()),
        name="bench",
    )
    await client.send_hello({"client_name": "bench"})
    await server.wait_hello()
    await server.send_hello({"session_id": "bench"})
    await client.wait_hello()
    return client, server, [loop.create_task(client.run()), loop.create_task(server.run())]


async def measure(
    connections: int, requests: int, rounds: int, *, access_log: bool, profile: bool
) -> list[tuple[float, float | None]]:
    """Microseconds of CPU per request, one pair per round: both sides', and the client's.

    The client's share is None in the compiled build, whose session methods
    cannot be wrapped with a clock.
    """
    client_session, server_session, tasks = await _sessions()
    # Everything the client does starts in one of these two.
    clock = _Clock()
    client_clock: _Clock | None = clock
    try:
        client_session.message_received = clock.wrap(client_session.message_received)  # type: ignore[method-assign]
        client_session._flush = clock.wrap(client_session._flush)  # type: ignore[method-assign]
    except AttributeError:  # compiled (HOMEPORT_COMPILE=1): its methods cannot be wrapped
        client_clock = None
    registry = Registry()
    registry.add(
        ConnectedClient(
            name="bench",
            session=server_session,
            routes={DEFAULT_ROUTE: Route(DEFAULT_ROUTE)},
            remote_addr="127.0.0.1",
            session_id="bench",
            max_streams=connections * 2,
        )
    )
    public = PublicServer(ServerConfig(token_digest(generate_token())), registry)
    null = os.open(os.devnull, os.O_WRONLY)
    public.access_log.fd, public.access_log.enabled = null, access_log
    try:
        bench = _Bench(public, connections)
        await bench.run(connections * 10)  # warm: streams opened and pooled
        gc.collect()
        gc.freeze()  # as homeport does once started
        results = []
        profiler = cProfile.Profile() if profile else None
        for _ in range(rounds):
            if profiler is not None:
                profiler.enable()
            if client_clock is not None:
                client_clock.seconds = 0.0
            started = time.process_time()
            await bench.run(requests)
            both = time.process_time() - started
            client = None if client_clock is None else client_clock.seconds * 1e6 / requests
            results.append((both * 1e6 / requests, client))
            if profiler is not None:
                profiler.disable()
        if profiler is not None:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    finally:
        client_session.close()
        server_session.close()
        await asyncio.wait(tasks, timeout=5)
        os.close(null)
    return results


def count_instructions(connections: int, access_log: bool) -> float:
    """Instructions per request (both sides), counted by valgrind: the same on every run.

    Two runs of 1,000 and 5,000 requests under callgrind; their difference
    leaves out the start-up and the warm-up.

    Raises:
        BenchError: valgrind is missing and cannot be installed, or a run failed.
    """
    valgrind = find_tool("valgrind")
    if valgrind is None:
        install([Tool("valgrind", ("valgrind",), "valgrind")])
        valgrind = find_tool("valgrind")
    if valgrind is None:
        raise BenchError("valgrind is still missing after apt-get install")
    counts = []
    with tempfile.TemporaryDirectory(prefix="homeport-hotpath-") as temp:
        for requests in INSTRUCTION_RUNS:
            command = [
                str(valgrind), "--tool=callgrind", f"--callgrind-out-file={temp}/out",
                sys.executable, "-m", "bench.hotpath", "--rounds", "1",
                "--requests", str(requests), "--connections", str(connections),
            ]  # fmt: skip
            if not access_log:
                command.append("--no-access-log")
            # A fixed hash seed: dict and set layouts, and so the count, repeat exactly.
            env = {**os.environ, "PYTHONHASHSEED": "0"}
            run = subprocess.run(
                command, capture_output=True, text=True, env=env, timeout=600, check=False
            )
            collected = re.search(r"Collected : (\d+)", run.stderr)
            if run.returncode != 0 or collected is None:
                raise BenchError(f"callgrind run failed: {run.stderr.strip()[-500:]}")
            counts.append(int(collected.group(1)))
    return (counts[1] - counts[0]) / (INSTRUCTION_RUNS[1] - INSTRUCTION_RUNS[0])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hotpath", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--connections", type=int, default=100, metavar="N")
    parser.add_argument("--requests", type=int, default=20_000, metavar="N", help="per round")
    parser.add_argument("--rounds", type=int, default=7, metavar="N")
    parser.add_argument(
        "--no-access-log", dest="access_log", action="store_false", help="as --access-log off"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the rounds")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions per request with valgrind instead (about a minute)",
    )
    args = parser.parse_args(argv)
    if args.instructions:
        status, count = run_command(
            parser.prog, lambda: count_instructions(args.connections, args.access_log)
        )
        if count is not None:
            print(f"c={args.connections}: {count:,.0f} instructions per request (both sides)")
        return status
    import uvloop

    results = uvloop.run(
        measure(
            args.connections,
            args.requests,
            args.rounds,
            access_log=args.access_log,
            profile=args.profile,
        )
    )
    both = sorted(total for total, _ in results)
    line = (
        f"c={args.connections}, CPU per request, best and median of {args.rounds} rounds: "
        f"both sides {both[0]:.1f} us ({both[len(both) // 2]:.1f})"
    )
    if all(client is not None for _, client in results):
        server = sorted(total - (client or 0.0) for total, client in results)
        client = sorted(client or 0.0 for _, client in results)
        line += (
            f", exit server {server[0]:.1f} us ({server[len(server) // 2]:.1f}), "
            f"client {client[0]:.1f} us ({client[len(client) // 2]:.1f})"
        )
    else:
        line += " (the compiled build: its sides are not told apart)"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
