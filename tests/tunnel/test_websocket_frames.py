"""Received frames read by homeport itself, checked against websockets reading all of them.

Once the handshake is done a connection reads data frames itself and hands
everything else to websockets (tunnel/websocket.py). Whatever bytes arrive,
however split, it must end exactly as a connection where websockets reads
every frame: the same messages delivered, the same bytes written back
(pongs, close frames), the same close codes and the same state.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.server import ServerProtocol
from websockets.speedups import apply_mask
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from tunnel.errors import ErrorCode
from tunnel.websocket import (
    _MIN_READ_BYTES,
    MAX_MESSAGE_BYTES,
    SUBPROTOCOL,
    ClientConnection,
    ServerConnection,
    WebSocketConnection,
)

#: The most one read delivers: what a connection always has room for.
READ_BYTES = _MIN_READ_BYTES
KEY = b"\x11\x22\x33\x44"
LARGE_SIZES = [0, 1, 125, 126, 127, 65_535, 65_536, 70_000]


def frame(first: int, payload: bytes, *, masked: bool, length: int | None = None) -> bytes:
    """One frame as RFC 6455 §5.2 lays it out; ``length`` may lie about the payload."""
    size = len(payload) if length is None else length
    mask_bit = 0x80 if masked else 0
    if size < 126:
        head = struct.pack("!BB", first, mask_bit | size)
    elif size < 65_536:
        head = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, size)
    return head + KEY + apply_mask(payload, KEY) if masked else head + payload


def pattern(size: int) -> bytes:
    return bytes((i * 7 + size) % 251 for i in range(size))


def frames(masked: bool) -> st.SearchStrategy[bytes]:
    """Frames a peer may send: the tunnel's own, control frames, and every kind of wrong one."""
    correct = masked  # what the reading side expects
    small = st.binary(max_size=40)
    return st.one_of(
        small.map(lambda p: frame(0x82, p, masked=correct)),
        st.sampled_from(LARGE_SIZES).map(lambda n: frame(0x82, pattern(n), masked=correct)),
        st.binary(max_size=125).map(lambda p: frame(0x89, p, masked=correct)),  # ping
        st.binary(max_size=125).map(lambda p: frame(0x8A, p, masked=correct)),  # pong
        st.builds(
            lambda code, reason: frame(0x88, struct.pack("!H", code) + reason, masked=correct),
            st.sampled_from([1000, 1001, 1002, 1008, 4000, 999, 1005, 5000]),
            st.sampled_from([b"", b"bye", b"\xff\xfe"]),
        ),
        st.sampled_from([b"", b"\x03"]).map(lambda p: frame(0x88, p, masked=correct)),
        small.map(lambda p: frame(0x81, p, masked=correct)),  # text
        small.map(lambda p: frame(0x02, p, masked=correct)),  # a first fragment
        small.map(lambda p: frame(0x80, p, masked=correct)),  # a continuation
        small.map(lambda p: frame(0x82, p, masked=not correct)),  # wrong masking
        small.map(lambda p: frame(0xC2, p, masked=correct)),  # a reserved bit
        small.map(lambda p: frame(0x83, p, masked=correct)),  # a reserved opcode
        st.just(frame(0x89, b"", masked=correct, length=126)),  # a control frame too long
        st.just(frame(0x82, b"", masked=correct, length=MAX_MESSAGE_BYTES + 1)),  # too long
        st.binary(min_size=1, max_size=12),  # not a frame at all
    )


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = self.aborted = self.eof = False

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, parts: Any) -> None:
        for part in parts:
            self.written += part

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


class Collector:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.closed: tuple[ErrorCode, str] | None = None

    def message_received(self, message: bytes) -> None:
        self.messages.append(bytes(message))

    def channel_closed(self, code: ErrorCode, reason: str) -> None:
        self.closed = (code, reason)

    def channel_paused(self) -> None:
        pass

    def channel_resumed(self) -> None:
        pass


@dataclass
class Outcome:
    messages: list[bytes]
    written: bytes
    transport: tuple[bool, bool, bool]
    state: str
    close_received: tuple[int, str] | None
    close_sent: tuple[int, str] | None
    told: tuple[ErrorCode, str] | None


def outcome(connection: WebSocketConnection, transport: FakeTransport, told: Collector) -> Outcome:
    protocol = connection.protocol
    received, sent = protocol.close_rcvd, protocol.close_sent
    return Outcome(
        told.messages,
        re.sub(rb"\r\nDate: [^\r]*", b"", bytes(transport.written)),
        (transport.closed, transport.aborted, transport.eof),
        protocol.state.name,
        (received.code, received.reason) if received else None,
        (sent.code, sent.reason) if sent else None,
        told.closed,
    )


def cuts(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def attach(connection: WebSocketConnection) -> tuple[FakeTransport, Collector]:
    """Give ``connection`` a transport and a handler, as the session would."""
    transport = FakeTransport()
    told = Collector()
    connection.handler = told
    connection.connection_made(transport)  # type: ignore[arg-type]
    return transport, told


def receive(connection: WebSocketConnection, data: bytes) -> None:
    """``data`` arriving as a transport delivers it: each read fills at most the buffer offered.

    And at most :data:`READ_BYTES`, which every connection always offers, so
    that ours and the reference, given the same bytes, read them in the same
    pieces. Ours grows its buffer for the frame it is reading and the
    reference does not, so their pieces would otherwise differ, and with them
    the close code when a text frame and a protocol error share a read:
    websockets parses a whole read ahead of us, and fails on the later error
    first (found by hypothesis: a 64 KiB frame, a text frame, a first
    fragment, a 64 KiB frame).
    """
    rest = memoryview(data)
    while rest:
        buffer = connection.get_buffer(-1)
        assert len(buffer) >= READ_BYTES
        count = min(READ_BYTES, len(rest))
        buffer[:count] = rest[:count]
        connection.buffer_updated(count)
        rest = rest[count:]


def feed(connection: WebSocketConnection, chunks: list[bytes], eof: bool) -> Outcome:
    transport, told = attach(connection)
    for chunk in chunks:
        receive(connection, chunk)
    if eof:
        connection.eof_received()
    result = outcome(connection, transport, told)
    connection.connection_lost(None)  # cancels its timers
    return result


def handshake_request() -> bytes:
    client = ClientProtocol(
        parse_uri("ws://exit.example/"), subprotocols=[Subprotocol(SUBPROTOCOL)]
    )
    client.send_request(client.connect())
    return b"".join(client.data_to_send())


class ReferenceServer(ServerConnection):
    frame_splitting = False


def server(reference: bool) -> ServerConnection:
    kind: Callable[..., ServerConnection] = ReferenceServer if reference else ServerConnection
    return kind(lambda _c, _r: None, lambda _c, _r: None)


EXAMPLES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@EXAMPLES
@given(
    sent=st.lists(frames(masked=True), max_size=8),
    points=st.lists(st.integers(0, 2**20), max_size=6),
    eof=st.booleans(),
)
# Found by hypothesis: a text frame fails the connection, and the data frame
# after it must not be delivered, whether or not it came in the same read.
@example(
    sent=[
        frame(0x82, pattern(65_535), masked=True),
        frame(0x81, b"", masked=True),
        frame(0x82, pattern(65_535), masked=True),
    ],
    points=[],
    eof=False,
)
# Found by hypothesis: an unmasked close frame is refused from its head, before
# its payload has come (websockets answers 1002 at once).
@example(sent=[frame(0x88, b"", masked=False, length=1)], points=[], eof=False)
async def test_the_exit_server_reads_any_frames_as_websockets_does(
    sent: list[bytes], points: list[int], eof: bool
) -> None:
    data = handshake_request() + b"".join(sent)
    chunks = cuts(data, points)
    assert feed(server(reference=False), chunks, eof) == feed(server(reference=True), chunks, eof)


async def test_the_tunnels_own_messages_skip_websockets_reader() -> None:
    """The fast path is taken: a data frame arriving whole is never parsed by websockets."""
    connection = server(reference=False)
    transport, told = attach(connection)
    receive(connection, handshake_request())
    parsed: list[bytes] = []
    original = connection.protocol.receive_data
    connection.protocol.receive_data = lambda data: (parsed.append(data), original(data))[1]  # type: ignore[method-assign]
    receive(connection, frame(0x82, b"hello", masked=True) + frame(0x89, b"p", masked=True))
    assert told.messages == [b"hello"]
    assert parsed == [frame(0x89, b"p", masked=True)]  # only the ping went to websockets
    assert transport.written.endswith(b"\x8a\x01p")  # and it answered it
    connection.connection_lost(None)


@pytest.mark.parametrize(
    ("first", "length"),
    [(0x88, 2**40), (0x89, 2**40), (0x82, MAX_MESSAGE_BYTES + 1)],
    ids=["close of 1 TiB", "ping of 1 TiB", "message over the limit"],
)
async def test_a_frame_announcing_too_long_a_payload_is_refused_before_its_payload(
    first: int, length: int
) -> None:
    """Nothing waits for (and buffers) a payload the header already makes illegal."""
    connection = server(reference=False)
    attach(connection)
    receive(connection, handshake_request())
    receive(connection, frame(first, b"", masked=True, length=length))
    sent = connection.protocol.close_sent
    assert sent is not None
    assert sent.code == 1009  # message too big
    connection.connection_lost(None)


def unmasked_frames(data: bytes) -> list[tuple[int, bytes]]:
    """The (first byte, payload) of each frame in ``data``, unmasked (what a client wrote)."""
    found = []
    while len(data) >= 2:
        first, second = data[0], data[1]
        length, head = second & 0x7F, 2
        if length == 126:
            length, head = struct.unpack_from("!H", data, 2)[0], 4
        elif length == 127:
            length, head = struct.unpack_from("!Q", data, 2)[0], 10
        key = data[head : head + 4] if second & 0x80 else b""
        head += len(key)
        payload = data[head : head + length]
        found.append((first, apply_mask(payload, key) if key else payload))
        data = data[head + length :]
    return found


class ReferenceClient(ClientConnection):
    frame_splitting = False


@dataclass
class Dialled:
    """A client that has sent its handshake, and the exit server's (websockets') answer."""

    connection: ClientConnection
    transport: FakeTransport
    told: Collector
    handshake: asyncio.Future[None]
    answer: bytes


def dial(kind: type[ClientConnection] = ClientConnection) -> Dialled:
    handshake = asyncio.get_running_loop().create_future()
    connection = kind("ws://exit.example/", {}, None, handshake)
    transport, told = attach(connection)
    exit_server = ServerProtocol(subprotocols=[Subprotocol(SUBPROTOCOL)])
    exit_server.receive_data(bytes(transport.written))
    exit_server.send_response(exit_server.accept(exit_server.events_received()[0]))
    return Dialled(connection, transport, told, handshake, b"".join(exit_server.data_to_send()))


async def client_outcome(reference: bool, sent: list[bytes], points: list[int], eof: bool) -> Any:
    """A client dials, the exit server (websockets) accepts, and then sends ``sent``."""
    dialled = dial(ReferenceClient if reference else ClientConnection)
    connection, transport, told = dialled.connection, dialled.transport, dialled.told
    request_bytes = len(transport.written)
    for chunk in cuts(dialled.answer + b"".join(sent), points):
        receive(connection, chunk)
    if eof:
        connection.eof_received()
    protocol = connection.protocol
    received, closing = protocol.close_rcvd, protocol.close_sent
    result = (
        told.messages,
        unmasked_frames(bytes(transport.written[request_bytes:])),
        (transport.closed, transport.aborted, transport.eof),
        protocol.state.name,
        (received.code, received.reason) if received else None,
        (closing.code, closing.reason) if closing else None,
        told.closed,
        dialled.handshake.done() and dialled.handshake.exception() is None,
    )
    connection.connection_lost(None)
    return result


@EXAMPLES
@given(
    sent=st.lists(frames(masked=False), max_size=8),
    points=st.lists(st.integers(0, 2**20), max_size=6),
    eof=st.booleans(),
)
# The same for the client: a masked ping refused from its head.
@example(sent=[frame(0x89, b"", masked=True, length=1)], points=[], eof=False)
# Found by hypothesis: a text frame, then a protocol error, read in the same
# piece by one and in two by the other, closed with 1003 and 1002 (receive()).
@example(
    sent=[
        frame(0x82, pattern(65_535), masked=False),
        frame(0x81, b"", masked=False),
        frame(0x02, b"", masked=False),
        frame(0x82, pattern(65_535), masked=False),
    ],
    points=[],
    eof=False,
)
async def test_the_client_reads_any_frames_as_websockets_does(
    sent: list[bytes], points: list[int], eof: bool
) -> None:
    ours = await client_outcome(False, sent, points, eof)
    assert ours == await client_outcome(True, sent, points, eof)


@pytest.mark.parametrize("size", [256 * 1024, MAX_MESSAGE_BYTES], ids=["256 KiB", "the limit"])
async def test_large_frames_cut_anywhere_arrive_whole(size: int) -> None:
    """Frames larger than the receive buffer grow it; a frame cut by a read is completed in place.

    Sizes differ by a few bytes so that no read ends where a frame does.
    """
    source = random.Random(size)
    payloads = [source.randbytes(size - 3 * i) for i in range(5)]
    data = handshake_request() + b"".join(frame(0x82, p, masked=True) for p in payloads)
    points = [source.randrange(len(data)) for _ in range(12)]
    assert feed(server(reference=False), cuts(data, points), eof=False).messages == payloads


@pytest.mark.parametrize(("first_cut", "second_cut"), [(0, 6), (1, 6), (2, 6), (6, 7), (3, 10)])
async def test_a_frame_inside_a_payload_is_never_read_as_a_frame(
    first_cut: int, second_cut: int
) -> None:
    """Whatever the reads, the frame boundaries are the sender's: a payload cannot smuggle one.

    The payload on the wire is itself a well-formed frame; the stream is cut
    right after the handshake and at points inside the outer frame's head.
    """
    inner = frame(0x82, b"smuggled", masked=True)
    outer_payload = apply_mask(inner, KEY)  # masked by the sender, it reads as ``inner``
    outer = frame(0x82, outer_payload, masked=True)
    assert outer.endswith(inner)
    request = handshake_request()
    connection = server(reference=False)
    _, told = attach(connection)
    for chunk in (request + outer[:first_cut], outer[first_cut:second_cut], outer[second_cut:]):
        receive(connection, chunk)
    assert told.messages == [outer_payload]
    connection.connection_lost(None)


@pytest.mark.parametrize("kind", ["server", "client"])
async def test_a_handshake_arriving_byte_by_byte_then_frames_works(kind: str) -> None:
    """The end of the handshake's head is found however it is split (here: a byte a read)."""
    if kind == "server":
        messages = feed(
            server(reference=False),
            [bytes([b]) for b in handshake_request() + frame(0x82, b"first", masked=True)],
            eof=False,
        ).messages
    else:
        dialled = dial()
        for byte in dialled.answer + frame(0x82, b"first", masked=False):
            receive(dialled.connection, bytes([byte]))
        assert dialled.handshake.done()
        assert dialled.handshake.exception() is None
        messages = dialled.told.messages
        dialled.connection.connection_lost(None)
    assert messages == [b"first"]
