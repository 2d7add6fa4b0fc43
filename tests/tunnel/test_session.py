"""The asyncio session, over an in-memory channel pair and over a real loopback websocket."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from websockets.frames import Frame, Opcode

from tests.support.channels import MemoryChannel, websocket_pair
from tests.support.waiting import wait_until
from tunnel.errors import ErrorCode, SessionClosed, StreamReset, TunnelError
from tunnel.frames import Data, encode
from tunnel.mux import Multiplexer, Role, Settings
from tunnel.session import (
    FLUSH_AFTER_QUEUED,
    Channel,
    Session,
    SessionEnd,
    Stream,
    StreamHandler,
)


@dataclass(eq=False)
class Collector(StreamHandler):
    """Records what a stream delivers; can stop reading on demand."""

    stream: Stream | None = None
    data: bytearray = field(default_factory=bytearray)
    eof: bool = False
    closed: bool = False
    error: TunnelError | None = None
    paused_writing: int = 0
    resumed_writing: int = 0

    def data_received(self, data: bytes | memoryview) -> None:
        self.data += data

    def eof_received(self) -> None:
        self.eof = True

    def stream_closed(self, exc: TunnelError | None) -> None:
        self.closed = True
        self.error = exc

    def pause_writing(self) -> None:
        self.paused_writing += 1

    def resume_writing(self) -> None:
        self.resumed_writing += 1


class Echo(StreamHandler):
    """The client side of a test: sends back whatever arrives, then ends."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def data_received(self, data: bytes | memoryview) -> None:
        self.stream.write(bytes(data))

    def eof_received(self) -> None:
        self.stream.write_eof()


@dataclass
class Sessions:
    client: Session
    server: Session
    tasks: list[asyncio.Task[SessionEnd]]


@contextlib.asynccontextmanager
async def running(
    channels: tuple[Channel, Channel],
    accept: Callable[[Stream], StreamHandler],
    *,
    client_window: int = 256 * 1024,
    heartbeat: tuple[float, float] = (10.0, 20.0),
) -> AsyncIterator[Sessions]:
    loop = asyncio.get_running_loop()
    interval, timeout = heartbeat
    client_mux = Multiplexer(
        Role.CLIENT,
        Settings(initial_window_bytes=client_window),
        heartbeat_interval_s=interval,
        heartbeat_timeout_s=timeout,
        now=loop.time(),
    )
    server_mux = Multiplexer(
        Role.SERVER,
        Settings(max_concurrent_streams=0),
        heartbeat_interval_s=interval,
        heartbeat_timeout_s=timeout,
        now=loop.time(),
    )
    client = Session(channels[0], client_mux, name="client", accept_stream=accept)
    server = Session(channels[1], server_mux, name="server")
    await client.send_hello({"client_name": "test"})
    assert (await server.wait_hello())["client_name"] == "test"
    await server.send_hello({"session_id": "s1"})
    assert (await client.wait_hello())["session_id"] == "s1"
    tasks = [asyncio.create_task(client.run()), asyncio.create_task(server.run())]
    try:
        yield Sessions(client, server, tasks)
    finally:
        client.close()
        server.close()
        await asyncio.wait(tasks, timeout=10)


@pytest.fixture(params=["memory", "websocket"])
async def channels(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Channel, Channel]]:
    if request.param == "memory":
        yield MemoryChannel.pair()
    else:
        async with websocket_pair() as pair:
            yield pair


async def test_many_concurrent_streams_carry_their_bytes_intact(
    channels: tuple[Channel, Channel],
) -> None:
    rng = random.Random(7)
    async with running(channels, Echo) as s:
        payloads = [rng.randbytes(rng.choice([0, 1, 100, 70_000, 600_000])) for _ in range(120)]
        handlers = [Collector() for _ in payloads]
        for payload, handler in zip(payloads, handlers, strict=True):
            stream = s.server.open_stream("", handler)
            stream.write(payload)
            stream.write_eof()
        await wait_until(lambda: all(h.closed for h in handlers), within=30)
        for payload, handler in zip(payloads, handlers, strict=True):
            assert handler.error is None
            assert hashlib.sha256(handler.data).digest() == hashlib.sha256(payload).digest()
        await wait_until(lambda: not s.server.streams and not s.client.streams)
        assert s.server.mux.statistics().open_streams == 0
        assert s.client.mux.statistics().open_streams == 0


async def test_a_burst_of_writes_leaves_in_several_messages_before_the_loop_turns(
    channels: tuple[Channel, Channel],
) -> None:
    # 100 requests read in one loop iteration: the first ones must not wait
    # for the last before the peer can start on them.
    async with running(channels, Echo) as s:
        handlers = [Collector() for _ in range(100)]
        sent_before = s.server.messages_sent
        for n, handler in enumerate(handlers):
            stream = s.server.open_stream("", handler)
            stream.write(b"request %d" % n)
            stream.write_eof()
        burst = s.server.messages_sent - sent_before
        assert burst >= 300 // FLUSH_AFTER_QUEUED - 1
        await wait_until(lambda: all(h.closed for h in handlers), within=30)
        for n, handler in enumerate(handlers):
            assert handler.error is None
            assert handler.data == b"request %d" % n


async def test_a_stalled_stream_does_not_block_the_others(
    channels: tuple[Channel, Channel],
) -> None:
    stalled_side: list[Stream] = []

    def accept(stream: Stream) -> StreamHandler:
        if not stalled_side:
            stalled_side.append(stream)
            stream.pause_reading()  # this consumer never reads
            return Collector()
        return Echo(stream)

    async with running(channels, accept) as s:
        stalled = Collector()
        stream = s.server.open_stream("", stalled)
        stream.write(b"x" * (4 * 1024 * 1024))
        await wait_until(lambda: stalled.paused_writing > 0)
        for n in range(20):
            fast = Collector()
            fast_stream = s.server.open_stream("", fast)
            fast_stream.write(b"ping %d" % n)
            fast_stream.write_eof()
            await asyncio.wait_for(_closed(fast), timeout=5)
            assert fast.data == b"ping %d" % n
        # Memory held for the stalled stream stays bounded by its window.
        assert s.client.mux.statistics().held_receive_bytes <= 256 * 1024


async def _closed(handler: Collector) -> None:
    await wait_until(lambda: handler.closed, within=5)


async def test_reading_again_resumes_the_paused_writer(channels: tuple[Channel, Channel]) -> None:
    client_streams: list[Stream] = []
    received = bytearray()

    class Slow(StreamHandler):
        def data_received(self, data: bytes | memoryview) -> None:
            received.extend(data)

    def accept(stream: Stream) -> StreamHandler:
        client_streams.append(stream)
        stream.pause_reading()
        return Slow()

    async with running(channels, accept, client_window=64 * 1024) as s:
        writer = Collector()
        stream = s.server.open_stream("", writer)
        stream.write(b"y" * (1024 * 1024))
        await wait_until(lambda: client_streams and writer.paused_writing == 1)
        client_streams[0].resume_reading()
        await wait_until(lambda: len(received) == 1024 * 1024, within=20)
        await wait_until(lambda: writer.resumed_writing >= 1)


async def test_a_reset_reaches_the_peer_with_its_code(channels: tuple[Channel, Channel]) -> None:
    peers: list[Collector] = []

    def accept(stream: Stream) -> StreamHandler:
        peers.append(Collector(stream))
        return peers[-1]

    async with running(channels, accept) as s:
        mine = Collector()
        stream = s.server.open_stream("", mine)
        stream.write(b"hello")
        await wait_until(lambda: peers and peers[0].data == b"hello")
        stream.reset(ErrorCode.CANCEL)
        await wait_until(lambda: peers[0].closed)
        assert isinstance(peers[0].error, StreamReset)
        assert peers[0].error.code is ErrorCode.CANCEL
        assert peers[0].error.remote
        await wait_until(lambda: mine.closed)
        assert isinstance(mine.error, StreamReset)
        assert not mine.error.remote


async def test_closing_the_session_fails_every_open_stream(
    channels: tuple[Channel, Channel],
) -> None:
    async with running(channels, Echo) as s:
        handlers = [Collector() for _ in range(5)]
        for handler in handlers:
            s.server.open_stream("", handler).write(b"open")
        s.server.close(ErrorCode.GOING_AWAY, "shutting down")
        ends = await asyncio.wait_for(asyncio.gather(*s.tasks), timeout=10)
        await wait_until(lambda: all(h.closed for h in handlers))
        assert all(isinstance(h.error, SessionClosed) for h in handlers)
        assert ends[1] == SessionEnd(ErrorCode.GOING_AWAY, "shutting down", by_peer=False)
        assert ends[0].by_peer
        assert ends[0].code is ErrorCode.GOING_AWAY


async def test_a_handler_that_raises_costs_only_its_own_stream(
    channels: tuple[Channel, Channel],
) -> None:
    class Broken(StreamHandler):
        def data_received(self, data: bytes | memoryview) -> None:
            raise RuntimeError("bug in a handler")

    def accept(stream: Stream) -> StreamHandler:
        return Broken() if stream.route == "broken" else Echo(stream)

    async with running(channels, accept) as s:
        victim = Collector()
        s.server.open_stream("broken", victim).write(b"boom")
        await wait_until(lambda: victim.closed)
        assert isinstance(victim.error, StreamReset)
        assert victim.error.code is ErrorCode.INTERNAL_ERROR
        healthy = Collector()
        stream = s.server.open_stream("", healthy)
        stream.write(b"still fine")
        stream.write_eof()
        await wait_until(lambda: healthy.closed)
        assert healthy.data == b"still fine"


async def test_a_protocol_violation_ends_the_session_for_every_stream() -> None:
    client_channel, server_channel = MemoryChannel.pair()
    async with running((client_channel, server_channel), Echo) as s:
        handler = Collector()
        s.server.open_stream("", handler).write(b"x")
        # A rogue client sends DATA for a stream that was never opened.
        client_channel.send_message([encode(Data(99, b"forged"))])
        end = await asyncio.wait_for(s.tasks[1], timeout=5)
        assert end.code is ErrorCode.PROTOCOL_ERROR
        assert not end.by_peer
        await wait_until(lambda: handler.closed)
        assert isinstance(handler.error, SessionClosed)


async def test_a_silent_peer_is_detected_by_the_heartbeat() -> None:
    client_channel, server_channel = MemoryChannel.pair()
    async with running((client_channel, server_channel), Echo, heartbeat=(0.1, 0.3)) as s:
        client_channel.freeze()  # the link went silent: no FIN, nothing more either way
        end = await asyncio.wait_for(s.tasks[1], timeout=5)
        assert end.code is ErrorCode.HEARTBEAT_TIMEOUT


async def test_heartbeats_keep_an_idle_session_alive_and_measure_round_trips(
    channels: tuple[Channel, Channel],
) -> None:
    async with running(channels, Echo, heartbeat=(0.05, 0.3)) as s:
        await wait_until(lambda: s.server.round_trip_s is not None, within=5)
        await asyncio.sleep(0.6)  # twice the timeout with no streams: still up
        assert not any(t.done() for t in s.tasks)


async def test_a_text_message_on_the_websocket_closes_with_1003() -> None:
    async with (
        websocket_pair() as (client_channel, server_channel),
        running((client_channel, server_channel), Echo) as s,
    ):
        assert client_channel.transport is not None
        client_channel.transport.write(
            Frame(Opcode.TEXT, b"text is not allowed").serialize(mask=True)
        )
        end = await asyncio.wait_for(s.tasks[1], timeout=5)
        assert end.code is ErrorCode.PROTOCOL_ERROR
        await client_channel.wait_closed()
        assert client_channel.protocol.close_rcvd is not None
        assert client_channel.protocol.close_rcvd.code == 1003
