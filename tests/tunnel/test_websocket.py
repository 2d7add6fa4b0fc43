"""Data messages, framed by homeport itself, as websockets reads them on the other side."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from tests.support.channels import websocket_pair
from tunnel.errors import ErrorCode
from tunnel.tls import Certificate, ensure_self_signed
from tunnel.websocket import MASK_KEY_POOL_BYTES, TLS_JOIN_BELOW_BYTES


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    return ensure_self_signed(Path(tmp_path_factory.mktemp("tls")), ["127.0.0.1"])


class Collector:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.arrived = asyncio.Event()

    def message_received(self, message: bytes) -> None:
        self.messages.append(message)
        self.arrived.set()

    def channel_closed(self, code: ErrorCode, reason: str) -> None:
        pass

    def channel_paused(self) -> None:
        pass

    def channel_resumed(self) -> None:
        pass


def split(payload: bytes, rng: random.Random) -> list[bytes | memoryview]:
    """``payload`` in random pieces, some bytes and some memoryview slices."""
    parts: list[bytes | memoryview] = []
    view = memoryview(payload)
    start = 0
    while start < len(payload):
        end = min(len(payload), start + rng.choice([1, 3, 10, 1000, 70_000]))
        parts.append(view[start:end] if rng.random() < 0.5 else payload[start:end])
        start = end
    return parts


# Every length encoding of RFC 6455 §5.2 and its edges: 7 bits, 16 bits, 64 bits.
SIZES = [1, 2, 125, 126, 127, 65_535, 65_536, 65_537, 300_000]


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
@pytest.mark.parametrize("sender", ["client", "server"])
async def test_messages_arrive_whole_and_in_order_in_both_directions(
    sender: str, tls: bool, certificate: Certificate
) -> None:
    rng = random.Random(sender)
    payloads = [rng.randbytes(size) for size in SIZES]
    async with websocket_pair(certificate if tls else None) as (client, server):
        source, sink = (client, server) if sender == "client" else (server, client)
        collector = Collector()
        sink.handler = collector
        for payload in payloads:
            source.send_message(split(payload, rng))
        source.send_message([payloads[-1]])  # one part: no join on the masking side
        async with asyncio.timeout(10):
            while len(collector.messages) < len(payloads) + 1:
                collector.arrived.clear()
                await collector.arrived.wait()
        assert collector.messages == [*payloads, payloads[-1]]


class RecordingTransport:
    """The client's transport, noting the masking key of every frame head written."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.keys: list[bytes] = []

    def writelines(self, parts: list[bytes]) -> None:
        head = bytes(parts[0])
        assert head[1] & 0x80, "a client's frame is masked"
        self.keys.append(head[-4:])
        self._transport.writelines(parts)

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)


async def test_a_client_masks_each_message_with_the_next_four_bytes_of_the_csprng(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with websocket_pair() as (client, server):
        reads: list[bytes] = []

        def urandom(size: int) -> bytes:
            reads.append(random.Random(len(reads)).randbytes(size))
            return reads[-1]

        monkeypatch.setattr(os, "urandom", urandom)
        recording = RecordingTransport(client.transport)
        client.transport = recording
        collector = Collector()
        server.handler = collector
        messages = [b"%d" % n for n in range(MASK_KEY_POOL_BYTES // 4 + 100)]
        for message in messages:
            client.send_message([message])
        async with asyncio.timeout(10):
            while len(collector.messages) < len(messages):
                collector.arrived.clear()
                await collector.arrived.wait()
    # websockets unmasked every message with the key its head carries ...
    assert collector.messages == messages
    # ... and the keys are the kernel's random bytes in order: one read per pool.
    assert [len(read) for read in reads] == [MASK_KEY_POOL_BYTES, MASK_KEY_POOL_BYTES]
    pool = b"".join(reads)
    assert recording.keys == [pool[at : at + 4] for at in range(0, 4 * len(messages), 4)]


class CountingTransport:
    """A transport that counts the writes it is asked for: each is a TLS record or more."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.writes: list[int] = []  # how many parts each write call carried

    def write(self, data: bytes) -> None:
        self.writes.append(1)
        self._transport.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        parts = list(parts)
        self.writes.append(len(parts))
        self._transport.writelines(parts)

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)


@pytest.mark.parametrize("sender", ["client", "server"])
async def test_over_tls_a_small_message_leaves_in_one_write(
    sender: str, certificate: Certificate
) -> None:
    # The TLS transport makes a record of each part it is given: a message of
    # 32 frames would be 65 records of a few bytes to 1 KiB each.
    small = [b"h" * 10, b"x" * 1024] * 32
    large = [b"h" * 10, b"y" * TLS_JOIN_BELOW_BYTES]
    async with websocket_pair(certificate) as (client, server):
        source, sink = (client, server) if sender == "client" else (server, client)
        counting = CountingTransport(source.transport)
        source.transport = counting
        collector = Collector()
        sink.handler = collector
        source.send_message(small)
        source.send_message(large)
        async with asyncio.timeout(10):
            while len(collector.messages) < 2:
                collector.arrived.clear()
                await collector.arrived.wait()
    assert collector.messages == [b"".join(small), b"".join(large)]
    assert counting.writes[0] == 1  # the small one: frame head and payload in one write
    assert counting.writes[1] > 1  # the large one: its parts as they are, not copied again


class Closes(Collector):
    def __init__(self) -> None:
        super().__init__()
        self.closed: asyncio.Future[tuple[ErrorCode, str]] = (
            asyncio.get_running_loop().create_future()
        )

    def channel_closed(self, code: ErrorCode, reason: str) -> None:
        if not self.closed.done():
            self.closed.set_result((code, reason))


async def test_a_close_reason_too_long_for_a_close_frame_is_cut_between_characters() -> None:
    async with websocket_pair() as (client, server):
        closes = Closes()
        client.handler = closes
        server.close(ErrorCode.PROTOCOL_ERROR, "version «" + "é" * 100 + "»")
        async with asyncio.timeout(10):
            code, reason = await closes.closed
        assert code is ErrorCode.PROTOCOL_ERROR
        assert reason == "version «" + "é" * 56  # 123 bytes: a close frame's room after its code
