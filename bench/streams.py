"""Memory per idle open stream: thousands of SSE visitors held open through one tunnel.

Each visitor connects, asks the idle upstream for an event stream (by its host
name, a route of its own on the homeport client, or its own ``ssh -R`` port),
reads the answer's head and its first event, and then holds the connection
open without a byte more: an SSE page or a long poll left open in a browser.
The visitors open in batches (1,000, then 9,000 more), and after each batch
the tunnel's server and client RSS are read. (RSS at N - RSS at 0) / N is what
one more such visitor costs each side.

The visitors are this process's own asyncio loop, run only while they open or
close: between batches the loop is stopped and the sockets sit idle in the
kernel, costing the measured processes nothing. Opening is bounded
(``CONNECT_CONCURRENCY`` connections in progress at once, a deadline for each
and one for the batch), and so is closing. A batch counts as open only when
the visitors have their first event, the idle upstream counts them open, and
(through homeport) the exit server's ``/status`` shows them as visitor
connections and streams.

Closing: the visitors close their connections, and the run waits until the
idle upstream and the exit server hold none of them. A proxy that treats the
visitor's FIN as a half-close (its request is complete; it may still want the
answer) only finds out that the visitor has gone when it next writes to it,
so when the streams are not all released within ``RELEASE_WAIT_S`` the idle
upstream sends an SSE heartbeat down every stream, once a second, until they
are (or ``CLOSE_TIMEOUT_S`` passes). The report says whether that was needed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final

from bench.errors import BenchError
from bench.idle_upstream import FIRST_EVENT, IdleUpstream
from bench.processes import LOOPBACK, Child, wait_until

IDLE_HOST: Final = "idle.bench"
IDLE_PATH: Final = "/events"
CONNECT_CONCURRENCY: Final = 200
CONNECT_TIMEOUT_S: Final = 30.0
# For a batch of N: this much, plus BATCH_TIMEOUT_PER_VISITOR_S for each.
# (homeport opens 9,000 in about 6 s here; ssh -R 6,400 in 40 s, slowing as it goes.)
BATCH_TIMEOUT_S: Final = 30.0
BATCH_TIMEOUT_PER_VISITOR_S: Final = 0.01
CONFIRM_TIMEOUT_S: Final = 30.0
CLOSE_TIMEOUT_S: Final = 60.0
RELEASE_WAIT_S: Final = 5.0
HEARTBEAT_INTERVAL_S: Final = 1.0
_ERROR_SAMPLES: Final = 5
_REQUEST: Final = (
    f"GET {IDLE_PATH} HTTP/1.1\r\nHost: {IDLE_HOST}\r\nAccept: text/event-stream\r\n\r\n".encode()
)

# Reads the exit server's /status, or None for a tunnel without one (ssh -R).
StatusReader = Callable[[], dict[str, Any]] | None


@dataclass(frozen=True)
class StreamsPoint:
    """The tunnel holding ``count`` idle streams open (as many as would open)."""

    count: int  # how many were asked for
    opened: int  # how many visitors had their first event
    failed: int
    open_s: float  # time to open this batch
    upstream_open: int  # what the idle upstream counted
    # The idle upstream (and the exit server's /status) counted all ``opened``.
    confirmed: bool
    server_status: dict[str, int] | None  # the exit server's visitor_connections and streams
    rss_bytes: dict[str, int | None]
    per_stream_bytes: dict[str, float | None]  # (RSS now - RSS at 0) / opened


@dataclass(frozen=True)
class StreamsResult:
    """Idle streams through one tunnel: the baseline, each batch, and after closing them all."""

    target: str
    baseline_rss_bytes: dict[str, int | None]
    points: list[StreamsPoint]
    closed_s: float | None  # from closing the visitors to the upstream and server seeing none
    # Heartbeats the idle upstream sent before every stream was released (0: none needed).
    heartbeats: int
    after_close_rss_bytes: dict[str, int | None]
    errors: dict[str, int]  # why visitors failed, by kind
    error_samples: list[str]

    def all_opened(self, count: int) -> bool:
        """Whether ``count`` streams were asked for, and all of them opened and were confirmed."""
        point = next((point for point in self.points if point.count == count), None)
        return point is not None and point.opened == count and point.confirmed


class IdleVisitors:
    """Visitors that hold an SSE answer open, driven by a loop of their own between batches."""

    def __init__(self, port: int, host: str) -> None:
        self.port = port
        self.host = host
        self.errors: collections.Counter[str] = collections.Counter()
        self.error_samples: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def open_count(self) -> int:
        """How many visitors hold their stream open."""
        return len(self._writers)

    def open(self, count: int, within_s: float) -> int:
        """Open ``count`` more visitors within ``within_s``; return how many failed."""
        failures_before = sum(self.errors.values())
        self._run(self._open(count, within_s))
        return sum(self.errors.values()) - failures_before

    def close(self, within_s: float) -> None:
        """Close every visitor's connection and wait (up to ``within_s``) until they are closed."""
        writers, self._writers = self._writers, []
        if writers:
            self._run(self._close(writers, within_s))

    def aclose_loop(self) -> None:
        """Close every connection that is left, then the loop."""
        try:
            self.close(CLOSE_TIMEOUT_S)
        finally:
            self._loop.close()

    def _run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine`` on the visitors' loop until it is done.

        Ctrl-C (or SIGTERM) lands in the middle of the loop as KeyboardInterrupt:
        every task still running is then cancelled and awaited (each closes its
        connection on the way out) before the interrupt goes on.
        """
        main = self._loop.create_task(coroutine)
        try:
            self._loop.run_until_complete(main)
        except BaseException:
            if main.done() and not main.cancelled():
                main.exception()  # retrieved: the interrupt goes on from here
            pending = [task for task in asyncio.all_tasks(self._loop) if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            raise

    async def _open(self, count: int, within_s: float) -> None:
        semaphore = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one() -> None:
            async with semaphore:
                await self._open_one()

        tasks = [asyncio.ensure_future(one()) for _ in range(count)]
        try:
            async with asyncio.timeout(within_s):
                await asyncio.gather(*tasks)
        except TimeoutError:
            # The deadline cancelled the gather, and with it every visitor still opening.
            await asyncio.gather(*tasks, return_exceptions=True)
            unfinished = sum(task.cancelled() for task in tasks)
            message = f"{unfinished} visitors not open after the batch's {within_s:.0f} s"
            self._failed("batch deadline", message, unfinished)

    async def _open_one(self) -> None:
        """Connect, ask for the event stream, and keep the connection once its first event came."""
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(LOOPBACK, self.port)
                writer.write(_REQUEST)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200 "):
                    status = head.split(b"\r\n", 1)[0].decode("ascii", "replace")
                    raise BenchError(f"answered {status!r}")
                await reader.readuntil(FIRST_EVENT.rstrip(b"\n"))
            self._writers.append(writer)
            writer = None
        except (OSError, TimeoutError, BenchError, asyncio.IncompleteReadError) as exc:
            self._failed(type(exc).__name__, str(exc) or type(exc).__name__)
        finally:
            if writer is not None:  # failed, or cancelled at the batch's deadline
                writer.close()

    async def _close(self, writers: list[asyncio.StreamWriter], within_s: float) -> None:
        for writer in writers:
            writer.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                await asyncio.gather(
                    *(writer.wait_closed() for writer in writers), return_exceptions=True
                )

    def _failed(self, kind: str, message: str, count: int = 1) -> None:
        self.errors[kind] += count
        if len(self.error_samples) < _ERROR_SAMPLES:
            self.error_samples.append(message)


def measure_streams(
    target: str,
    port: int,
    counts: Sequence[int],
    sides: dict[str, Child],
    idle_upstream: IdleUpstream,
    read_status: StatusReader,
) -> StreamsResult:
    """Open ``counts`` idle streams in turn through the tunnel at ``port``, reading RSS at each.

    ``sides`` are the tunnel's server and client. ``read_status`` reads the
    exit server's ``/status`` (None for ssh -R).

    Raises:
        BenchError: a process exited, or the streams were not all gone in time
            after the visitors closed.
    """
    if idle_upstream.open_streams() != 0:
        raise BenchError("the idle upstream holds streams open before the visitors came")
    baseline_status = _server_counts(read_status)
    baseline = _rss(sides)
    visitors = IdleVisitors(port, IDLE_HOST)
    points = []
    closed_s: float | None = None
    heartbeats = 0
    try:
        for count in sorted(counts):
            more = count - visitors.open_count
            started = time.monotonic()
            failed = visitors.open(more, BATCH_TIMEOUT_S + more * BATCH_TIMEOUT_PER_VISITOR_S)
            open_s = time.monotonic() - started
            opened = visitors.open_count
            upstream_open, confirmed = _confirm_open(opened, idle_upstream, read_status)
            rss = _rss(sides)
            per_stream = {side: _per_stream(rss[side], baseline[side], opened) for side in sides}
            points.append(
                StreamsPoint(
                    count=count,
                    opened=opened,
                    failed=failed,
                    open_s=open_s,
                    upstream_open=upstream_open,
                    confirmed=confirmed,
                    server_status=_server_counts(read_status),
                    rss_bytes=rss,
                    per_stream_bytes=per_stream,
                )
            )
            if failed:
                break  # the next batch would measure the same failure, only slower
        started = time.monotonic()
        visitors.close(CLOSE_TIMEOUT_S)
        heartbeats = _wait_released(idle_upstream, read_status, baseline_status)
        closed_s = time.monotonic() - started
    finally:
        visitors.aclose_loop()
    return StreamsResult(
        target=target,
        baseline_rss_bytes=baseline,
        points=points,
        closed_s=closed_s,
        heartbeats=heartbeats,
        after_close_rss_bytes=_rss(sides),
        errors=dict(visitors.errors),
        error_samples=visitors.error_samples,
    )


def _per_stream(rss: int | None, baseline: int | None, opened: int) -> float | None:
    """(RSS with ``opened`` streams - RSS with none) / ``opened``, or None if unknown."""
    if rss is None or baseline is None or not opened:
        return None
    return (rss - baseline) / opened


def _rss(sides: dict[str, Child]) -> dict[str, int | None]:
    """Each side's resident memory now (sshd: its listener and its connection process)."""
    return {name: child.tree_rss_bytes() for name, child in sides.items()}


def _server_counts(read_status: StatusReader) -> dict[str, int] | None:
    """The exit server's visitor connections and its client's streams, from ``/status``."""
    if read_status is None:
        return None
    status = read_status()
    clients = status.get("clients") or [{}]
    return {
        "visitor_connections": int(status.get("visitor_connections", 0)),
        "streams": int(clients[0].get("streams", 0)),
    }


def _confirm_open(
    opened: int, idle_upstream: IdleUpstream, read_status: StatusReader
) -> tuple[int, bool]:
    """Wait until the far end (and the exit server) count ``opened`` streams.

    Each visitor already has its first event, so they should count them at
    once; a shortfall after ``CONFIRM_TIMEOUT_S`` is returned, not raised, and
    shows in the report as streams that did not work.

    Returns:
        What the idle upstream counted, and whether every count was reached.
    """
    upstream_open = -1

    def counted() -> bool:
        nonlocal upstream_open
        upstream_open = idle_upstream.open_streams()
        server = _server_counts(read_status)
        # Not baseline + opened streams: the exit server may have closed a stream it
        # kept idle for reuse (the one that served the readiness check) meanwhile.
        on_server = server is None or (
            server["visitor_connections"] >= opened and server["streams"] >= opened
        )
        return upstream_open >= opened and on_server

    try:
        wait_until(counted, CONFIRM_TIMEOUT_S, f"{opened} idle streams counted open")
    except BenchError:
        return upstream_open, False
    return upstream_open, True


def _wait_released(
    idle_upstream: IdleUpstream, read_status: StatusReader, baseline: dict[str, int] | None
) -> int:
    """Wait until no stream of a visitor that left is held; return the heartbeats it took.

    Raises:
        BenchError: some were still held after ``CLOSE_TIMEOUT_S``.
    """

    def released() -> bool:
        server = _server_counts(read_status)
        on_server = server is None or (
            baseline is not None
            and server["visitor_connections"] == 0
            and server["streams"] <= baseline["streams"]
        )
        return on_server and idle_upstream.open_streams() == 0

    deadline = time.monotonic() + CLOSE_TIMEOUT_S
    with contextlib.suppress(BenchError):
        wait_until(released, RELEASE_WAIT_S, "idle streams released")
        return 0
    heartbeats = 0
    while time.monotonic() < deadline:
        idle_upstream.send_heartbeat()
        heartbeats += 1
        with contextlib.suppress(BenchError):
            wait_until(released, HEARTBEAT_INTERVAL_S, "idle streams released")
            return heartbeats
    raise BenchError(
        f"idle streams still held {CLOSE_TIMEOUT_S:.0f} s after their visitors left, "
        f"after {heartbeats} heartbeats"
    )
