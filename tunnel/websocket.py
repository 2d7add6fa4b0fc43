"""One websocket as an asyncio protocol, around websockets' sans-I/O layer.

websockets implements the protocol itself (the opening handshake, framing,
masking, ping/pong, the closing handshake); this module only moves bytes
between it and a transport, as the library's sans-I/O design intends. We
drive it ourselves rather than through websockets' asyncio connection so
that a message goes from the read to the session in the same
callback, with no reader task, no per-message future and no send lock: on
the tunnel's hot path those cost more than the framing (see
docs/performance.md).

:class:`ServerConnection` accepts a client on the control port and asks a
``decide`` callback about the HTTP request before upgrading.
:class:`ClientConnection` dials out, checks a pinned certificate as soon as
TLS is up (before a byte of HTTP is written), and resolves a future with the
handshake's outcome.

Received data frames are read here too, on the same grounds: once the
handshake is done, the stream is split into frames as it arrives. A final,
unfragmented binary frame with the masking the RFC asks of the peer and a
length within the limit (the tunnel's every message) is unmasked and
delivered at once; a close, ping or pong frame is handed to websockets
whole, so its parser always starts at a frame boundary and does the
protocol's work; anything else (text, fragments, reserved bits, wrong
masking, an oversized length) hands websockets the rest of the connection,
which it then reads exactly as it would have from the start. websockets'
reader would copy every payload twice more on its way through.

The transport reads straight into a buffer of ours (``asyncio``'s
``BufferedProtocol``) rather than handing over a new ``bytes`` per read, and
a frame cut by a read is completed where it lies rather than joined from
pieces: a payload is copied once in user space, where it is unmasked (or,
unmasked already, taken out of the buffer).
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from mypy_extensions import mypyc_attr
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import OPEN
from websockets.protocol import Protocol as WebSocketProtocol
from websockets.typing import Subprotocol

try:  # websockets' C masking, as websockets itself picks it
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - a build without its C extension
    from websockets.utils import apply_mask

from tunnel.errors import ErrorCode
from tunnel.frames import truncate_utf8
from tunnel.tls import PinMismatch, check_pin

if TYPE_CHECKING:
    from websockets.client import ClientProtocol
    from websockets.server import ServerProtocol

logger = logging.getLogger("homeport.tunnel")

SUBPROTOCOL: Final = "homeport.v1"
#: Messages are at most 1 MiB when sent; received ones may reach this.
MAX_MESSAGE_BYTES: Final = 2 * 1024 * 1024
HANDSHAKE_TIMEOUT_S: Final = 10.0
CLOSE_TIMEOUT_S: Final = 2.0
#: A close frame's payload is at most 125 bytes, two of them the code (RFC 6455 §5.5).
MAX_CLOSE_REASON_BYTES: Final = 123
#: Above this many bytes waiting in the socket's buffer, the session pauses.
WRITE_HIGH_WATER_BYTES: Final = 1024 * 1024
WRITE_LOW_WATER_BYTES: Final = 256 * 1024
#: Messages held while no session is attached yet (a HELLO, perhaps a PING).
MAX_EARLY_MESSAGES: Final = 16
#: Smaller masked messages are joined, then masked in one call; larger ones
#: are masked part by part, which spares copying every payload byte once.
MASK_JOIN_BELOW_BYTES: Final = 64 * 1024
#: Over TLS, smaller messages leave as one write: the TLS transport encrypts
#: each part it is given as a record of its own (a header of 10 bytes, a
#: payload of 1 KiB), where one record holds up to 16 KiB.
TLS_JOIN_BELOW_BYTES: Final = 64 * 1024
#: Masking keys are read from the kernel's CSPRNG this many bytes at a time
#: and used four by four: a system call per 1,024 messages, not one each.
MASK_KEY_POOL_BYTES: Final = 4096
#: The frames whose bytes go to websockets whole while we split the stream:
#: final close, ping and pong frames (RFC 6455 §5.5), with no reserved bits.
_CONTROL_FIRST_BYTES: Final = frozenset({0x88, 0x89, 0x8A})
_FINAL_BINARY: Final = 0x82
_END_OF_HEAD: Final = b"\r\n\r\n"
#: A handshake longer than this is left to websockets whole, frames and all.
MAX_HANDSHAKE_HEAD_BYTES: Final = 64 * 1024
#: The receive buffer: its size at the first read, the least room a read is
#: given, and the most it grows to (four of the largest frame: the frame not
#: yet whole is moved to the front once per buffer's worth read, so the
#: larger the buffer the rarer and smaller that copy).
_FIRST_READ_BUFFER_BYTES: Final = 64 * 1024
_MIN_READ_BYTES: Final = 16 * 1024
_MAX_READ_BUFFER_BYTES: Final = 4 * MAX_MESSAGE_BYTES
_HEAD_SHORT: Final = struct.Struct("!BB")
_HEAD_16: Final = struct.Struct("!BBH")
_HEAD_64: Final = struct.Struct("!BBQ")

# Websocket close codes (RFC 6455 §7.4) and homeport's own range 4000-4015,
# one per ErrorCode, for the ends the standard codes do not name.
_WS_CODE_FOR_ERROR: Final = {
    ErrorCode.NO_ERROR: 1000,
    ErrorCode.GOING_AWAY: 1001,
    ErrorCode.PROTOCOL_ERROR: 1002,
    ErrorCode.STREAM_CLOSED: 1002,
    ErrorCode.FLOW_CONTROL_ERROR: 1002,
    ErrorCode.FRAME_SIZE_ERROR: 1009,
    ErrorCode.ENHANCE_YOUR_CALM: 1008,
    ErrorCode.INTERNAL_ERROR: 1011,
}
_ERROR_FOR_WS_CODE: Final = {
    1000: ErrorCode.NO_ERROR,
    1001: ErrorCode.GOING_AWAY,
    1002: ErrorCode.PROTOCOL_ERROR,
    1003: ErrorCode.PROTOCOL_ERROR,
    1007: ErrorCode.PROTOCOL_ERROR,
    1008: ErrorCode.ENHANCE_YOUR_CALM,
    1009: ErrorCode.FRAME_SIZE_ERROR,
    1011: ErrorCode.INTERNAL_ERROR,
}


def ws_close_code(code: ErrorCode) -> int:
    """The websocket close code that ends a session for ``code``."""
    return _WS_CODE_FOR_ERROR.get(code, 4000 + int(code))


def error_code_for_close(ws_code: int | None) -> ErrorCode:
    """The :class:`ErrorCode` a received websocket close code stands for."""
    if ws_code is None:
        return ErrorCode.INTERNAL_ERROR
    if 4000 <= ws_code <= 4000 + max(ErrorCode):
        return ErrorCode(ws_code - 4000)
    return _ERROR_FOR_WS_CODE.get(ws_code, ErrorCode.INTERNAL_ERROR)


def _binary_frame_head(length: int, mask_key: bytes) -> bytes:
    """The head of a final binary frame (RFC 6455 §5.2): FIN, opcode, length, masking key."""
    mask_bit = 0x80 if mask_key else 0
    if length < 126:
        head = _HEAD_SHORT.pack(0x82, mask_bit | length)
    elif length < 65536:
        head = _HEAD_16.pack(0x82, mask_bit | 126, length)
    else:
        head = _HEAD_64.pack(0x82, mask_bit | 127, length)
    return head + mask_key


class MessageHandler(Protocol):
    """What a connection calls back once open (the session implements it)."""

    def message_received(self, message: bytes) -> None: ...

    def channel_closed(self, code: ErrorCode, reason: str) -> None: ...

    def channel_paused(self) -> None: ...

    def channel_resumed(self) -> None: ...


@mypyc_attr(allow_interpreted_subclasses=True)  # as its two subclasses below
class WebSocketConnection(asyncio.BufferedProtocol):
    """The part both sides share: binary messages once the handshake is done."""

    protocol: WebSocketProtocol
    #: Whether frames sent are masked: a client's always are (RFC 6455 §5.3).
    _masked = False
    #: Whether received data frames are read here once the handshake is done
    #: (the module's docstring); off, websockets reads every frame, which is
    #: what the tests compare this reading with.
    frame_splitting = True

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._handler: MessageHandler | None = None
        #: what arrived before a handler was attached (the client's HELLO can
        #: come right behind its upgrade request, before the session exists)
        self._early: list[bytes] = []
        self._closed_early = False
        self.remote_address = "-"
        self._loop = asyncio.get_running_loop()
        self._fragments: list[bytes] | None = None
        #: what the transport reads into; the bytes not yet taken are
        #: ``_buffer[_start:_end]``
        self._buffer = bytearray()
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0
        #: while the handshake's head is incomplete, how much of it was searched
        #: for its end; None after
        self._head_searched: int | None = 0
        #: whether we split frames (until something only websockets reads)
        self._splitting = self.frame_splitting
        #: the size of the frame at ``_start`` when it is not all here yet
        self._needed = 0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = self._loop.create_future()
        self._paused = False
        self._told_closed = False
        #: unused masking keys (a client's), and where the next one starts
        self._mask_keys = b""
        self._mask_key_at = 0
        #: whether we failed the connection for a frame it sent
        self._refused = False
        #: whether the transport is TLS (wss://), set once connected
        self._tls = False

    @property
    def handler(self) -> MessageHandler | None:
        return self._handler

    @handler.setter
    def handler(self, handler: MessageHandler | None) -> None:
        """Attach the session; it first gets what arrived before it existed."""
        self._handler = handler
        if handler is None:
            return
        early, self._early = self._early, []
        for message in early:
            handler.message_received(message)
        if self._closed_early:
            self._tell_closed()

    # -- what the session calls ------------------------------------------------------

    def send_message(self, parts: Sequence[bytes | memoryview]) -> None:
        """Send one binary message, the concatenation of ``parts``.

        The write never blocks (the transport buffers). websockets frames
        everything else (the handshake, control frames, the close); data
        messages, the tunnel's hot path, are framed here (RFC 6455 §5.2)
        because its serializer copies every payload byte twice more
        (docs/performance.md). The exit server writes the parts as they
        are; the client, which must mask, makes the one masked copy.
        """
        transport = self.transport
        if self.protocol.state is not OPEN or transport is None or transport.is_closing():
            return
        length = sum(map(len, parts))
        if not self._masked:
            if self._tls and length < TLS_JOIN_BELOW_BYTES:
                transport.write(b"".join((_binary_frame_head(length, b""), *parts)))
            else:
                transport.writelines((_binary_frame_head(length, b""), *parts))
            return
        key = self._next_mask_key()
        head = _binary_frame_head(length, key)
        if len(parts) == 1 or length < MASK_JOIN_BELOW_BYTES:
            payload = parts[0] if len(parts) == 1 else b"".join(parts)
            if self._tls and length < TLS_JOIN_BELOW_BYTES:
                transport.write(head + apply_mask(payload, key))
            else:
                transport.writelines((head, apply_mask(payload, key)))
            return
        # Mask each part where it lies in the payload: the key turns by its offset.
        masked = [head]
        offset = 0
        for part in parts:
            turn = offset & 3
            masked.append(apply_mask(part, key[turn:] + key[:turn] if turn else key))
            offset += len(part)
        transport.writelines(masked)

    def _next_mask_key(self) -> bytes:
        """A fresh masking key (RFC 6455 §5.3): four bytes the peer cannot predict.

        Consecutive slices of one ``os.urandom`` read are as unpredictable
        from each other as separate reads; only the system call is shared.
        """
        at = self._mask_key_at
        if at >= len(self._mask_keys):
            self._mask_keys = os.urandom(MASK_KEY_POOL_BYTES)
            at = 0
        self._mask_key_at = at + 4
        return self._mask_keys[at : at + 4]

    def close(self, code: ErrorCode, reason: str) -> None:
        """Start the closing handshake; the TCP connection ends within CLOSE_TIMEOUT_S."""
        if self.protocol.state is OPEN:
            reason = truncate_utf8(reason, MAX_CLOSE_REASON_BYTES).decode()
            self.protocol.send_close(ws_close_code(code), reason)
            self._write_out()
        self._arm(CLOSE_TIMEOUT_S, self.abort)

    def abort(self) -> None:
        """Drop the connection now (the peer is presumed dead)."""
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self) -> None:
        """Wait until the TCP connection is closed."""
        await asyncio.shield(self._closed)

    # -- asyncio protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._tls = transport.get_extra_info("ssl_object") is not None
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER_BYTES, WRITE_LOW_WATER_BYTES)
        peer = transport.get_extra_info("peername")
        if peer:
            host, port = peer[0], peer[1]
            self.remote_address = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self._buffer) - self._end < _MIN_READ_BYTES:
            self._make_room()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        if self._head_searched is not None:
            self._receive_head()
        elif self._splitting:
            self._split_frames()
        else:
            self._feed_protocol(self._take_all())

    def eof_received(self) -> bool:
        if self._end > self._start:
            # A frame (or a head) cut short: websockets says so at the EOF.
            self._head_searched, self._splitting, self._needed = None, False, 0
            self._feed_protocol(self._take_all())
        self.protocol.receive_eof()
        self._write_out()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self._closed.done():
            self._closed.set_result(None)
        self._tell_closed()

    def pause_writing(self) -> None:
        self._paused = True
        if self._handler is not None:
            self._handler.channel_paused()

    def resume_writing(self) -> None:
        self._paused = False
        if self._handler is not None:
            self._handler.channel_resumed()

    @property
    def paused(self) -> bool:
        return self._paused

    # -- internals ------------------------------------------------------------------------

    def _feed_protocol(self, data: bytes) -> None:
        """Give websockets ``data`` and act on what it makes of it."""
        protocol = self.protocol
        protocol.receive_data(data)
        for event in protocol.events_received():
            if type(event) is Frame:
                self._frame_received(event)
            else:
                self._handshake_event(event)
        self._write_out()
        if protocol.close_expected():
            self._arm(CLOSE_TIMEOUT_S, self.abort)

    def _make_room(self) -> None:
        """Room for a read: the bytes not taken moved to the front, the buffer grown if need be.

        It grows when the frame being read (or the bytes not taken) would not
        leave a read's room: a new buffer, so no view of the old one changes.
        """
        start, end = self._start, self._end
        unread = end - start
        size = len(self._buffer)
        frame = max(self._needed, unread)
        if frame + _MIN_READ_BYTES > size:
            grown_size = min(
                max(4 * frame, 2 * size, _FIRST_READ_BUFFER_BYTES), _MAX_READ_BUFFER_BYTES
            )
            grown = bytearray(max(grown_size, frame + _MIN_READ_BYTES))
            grown[:unread] = self._view[start:end]
            self._buffer, self._view = grown, memoryview(grown)
        elif start:
            self._view[:unread] = self._view[start:end]  # memmove: the two may overlap
        self._start, self._end = 0, unread

    def _take_all(self) -> bytes:
        """The bytes not taken yet, as one object; the buffer is empty after."""
        data = self._view[self._start : self._end].tobytes()
        self._start = self._end = 0
        return data

    def _receive_head(self) -> None:
        """Before the handshake is done: websockets gets its head, and only that."""
        start, end = self._start, self._end
        searched = self._head_searched or 0
        # Each byte is looked at once, but for a marker cut by a read.
        at = self._buffer.find(_END_OF_HEAD, start + max(0, searched - 3), end)
        if at < 0:
            if end - start > MAX_HANDSHAKE_HEAD_BYTES:
                self._head_searched, self._splitting = None, False
                self._feed_protocol(self._take_all())
            else:
                self._head_searched = end - start
            return
        self._head_searched = None
        head_end = at + len(_END_OF_HEAD)
        head = self._view[start:head_end].tobytes()
        self._start = head_end
        self._feed_protocol(head)
        if self.protocol.state is not OPEN:
            self._splitting = False  # refused: websockets deals with what follows
        if self._end > self._start:
            self.buffer_updated(0)
        else:
            self._start = self._end = 0

    def _split_frames(self) -> None:
        """Read whole frames from the buffer: data frames here, the rest through websockets."""
        start, end = self._start, self._end
        if end - start < self._needed:
            return  # the frame being read is not all here yet
        view = self._view
        needed = 0
        masked_in = not self._masked  # a server reads masked frames, a client plain ones
        protocol = self.protocol
        while start < end:
            if protocol.state is not OPEN:
                break  # closing: websockets has the last word
            available = end - start
            if available < 2:
                needed = 2
                break
            first, second = view[start], view[start + 1]
            length = second & 0x7F
            head = 2
            if length == 126:
                head = 4
                if available < head:
                    needed = head
                    break
                length = (view[start + 2] << 8) | view[start + 3]
            elif length == 127:
                head = 10
                if available < head:
                    needed = head
                    break
                length = int.from_bytes(view[start + 2 : start + 10])
            mask = second & 0x80
            if mask:
                head += 4
            # Anything websockets would refuse from its head alone (masking,
            # size) goes to it now, not once the frame is whole: it answers then.
            if first == _FINAL_BINARY:
                eligible = (
                    bool(mask) is masked_in
                    and length <= MAX_MESSAGE_BYTES
                    and self._fragments is None
                )
            else:
                eligible = (
                    first in _CONTROL_FIRST_BYTES and length <= 125 and bool(mask) is masked_in
                )
            if not eligible:
                break
            frame_end = start + head + length
            if frame_end > end:
                needed = head + length
                break
            if first == _FINAL_BINARY:
                payload = view[start + head : frame_end]
                if mask:
                    key = view[start + head - 4 : start + head].tobytes()
                    self._deliver(apply_mask(payload, key))
                else:
                    self._deliver(payload.tobytes())
            else:
                self._feed_protocol(view[start:frame_end].tobytes())
            start = frame_end
        else:
            self._start = self._end = self._needed = 0  # every byte taken
            return
        self._start = start
        self._needed = needed
        if needed:
            return
        # A frame only websockets reads, or the connection is closing: from
        # here on, websockets reads the connection, as it would have all along.
        self._splitting = False
        self._feed_protocol(self._take_all())

    def _frame_received(self, frame: Frame) -> None:
        if self._refused:
            # We failed the connection (a text frame) and websockets had
            # already parsed what came after it in the same read: ignored, as
            # it is when it comes in a later read, however the bytes were split.
            return
        opcode = frame.opcode
        if opcode is Opcode.BINARY and frame.fin and self._fragments is None:
            self._deliver(bytes(frame.data))
        elif opcode is Opcode.BINARY:
            self._fragments = [bytes(frame.data)]
        elif opcode is Opcode.CONT and self._fragments is not None:
            # websockets bounds the size of a fragmented message (max_size).
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                message, self._fragments = b"".join(self._fragments), None
                self._deliver(message)
        elif opcode is Opcode.TEXT:
            self._refused = True
            self.protocol.fail(1003, "binary messages only")
        elif opcode is Opcode.CLOSE:
            self._tell_closed()

    def _deliver(self, message: bytes) -> None:
        handler = self._handler
        if handler is not None:
            handler.message_received(message)
        elif len(self._early) < MAX_EARLY_MESSAGES:
            self._early.append(message)
        else:
            self.protocol.fail(1008, "too many messages before the session started")

    def _handshake_event(self, event: Any) -> None:
        """A Request (server side) or Response (client side)."""

    def _tell_closed(self) -> None:
        if self._handler is None:
            self._closed_early = True
            return
        if self._told_closed:
            return
        self._told_closed = True
        close = self.protocol.close_rcvd or self.protocol.close_sent
        if close is None:
            self._handler.channel_closed(ErrorCode.INTERNAL_ERROR, "connection lost")
        else:
            self._handler.channel_closed(error_code_for_close(close.code), close.reason)

    def _write_out(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        for data in self.protocol.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()

    def _arm(self, delay_s: float, callback: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(delay_s, callback)


@mypyc_attr(allow_interpreted_subclasses=True)  # the tests' reference peers subclass it
class ServerConnection(WebSocketConnection):
    """The control port's side: decides on the HTTP request, then carries a session.

    ``decide(connection, request)`` returns a response to refuse the upgrade
    (or to answer a plain request such as ``/healthz``), or None to accept.
    ``opened(connection, request)`` is called once the connection is a
    websocket, and ``lost(connection)``, when given, once it has closed.
    The HTTP handshake must be done by ``deadline`` (the loop's time: the
    exit server counts from the accept, so TLS and HTTP share it), or
    within :data:`HANDSHAKE_TIMEOUT_S` of the connection when None.
    """

    protocol: ServerProtocol

    def __init__(
        self,
        decide: Callable[[ServerConnection, Request], Response | None],
        opened: Callable[[ServerConnection, Request], None],
        *,
        deadline: float | None = None,
        lost: Callable[[ServerConnection], None] | None = None,
    ) -> None:
        from websockets.server import ServerProtocol  # the client never loads it

        super().__init__()
        self._decide = decide
        self._opened = opened
        self._deadline = deadline
        self._lost = lost
        self.protocol = ServerProtocol(
            subprotocols=[Subprotocol(SUBPROTOCOL)], max_size=MAX_MESSAGE_BYTES
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._deadline is None:
            self._arm(HANDSHAKE_TIMEOUT_S, self.abort)
        else:
            self._arm(max(0.0, self._deadline - self._loop.time()), self.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._lost is not None:
            lost, self._lost = self._lost, None
            lost(self)

    def _handshake_event(self, event: Any) -> None:
        if not isinstance(event, Request):
            return
        response = self._decide(self, event)
        if response is None:
            response = self.protocol.accept(event)
        if "Server" in response.headers:
            del response.headers["Server"]
        self.protocol.send_response(response)
        self._write_out()
        if response.status_code == 101:
            if self._timer is not None:
                self._timer.cancel()
            self._opened(self, event)


@mypyc_attr(allow_interpreted_subclasses=True)  # the tests' reference peers subclass it
class ClientConnection(WebSocketConnection):
    """The client's side: sends the handshake, checking a pinned certificate first."""

    _masked = True

    protocol: ClientProtocol

    def __init__(
        self, url: str, headers: dict[str, str], pin: bytes | None, handshake: asyncio.Future[None]
    ) -> None:
        from websockets.client import ClientProtocol  # the exit server never loads it
        from websockets.uri import parse_uri

        super().__init__()
        self.protocol = ClientProtocol(
            parse_uri(url), subprotocols=[Subprotocol(SUBPROTOCOL)], max_size=MAX_MESSAGE_BYTES
        )
        self._headers = headers
        self._pin = pin
        self._handshake = handshake

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._pin is not None:
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            try:
                check_pin(der, self._pin)
            except PinMismatch as exc:
                self._fail_handshake(exc)
                self.abort()  # not a byte of HTTP, so never the token
                return
        request = self.protocol.connect()
        for name, value in self._headers.items():
            request.headers[name] = value
        self.protocol.send_request(request)
        self._write_out()

    def _handshake_event(self, event: Any) -> None:
        if not isinstance(event, Response):
            return
        failure = self.protocol.handshake_exc
        if failure is None:
            if not self._handshake.done():
                self._handshake.set_result(None)
        else:
            self._fail_handshake(failure)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._fail_handshake(exc or ConnectionResetError("connection closed during the handshake"))

    def _fail_handshake(self, exc: BaseException) -> None:
        if not self._handshake.done():
            self._handshake.set_exception(exc)


def rejection(
    status: int,
    text: str,
    headers: dict[str, str] | None = None,
    content_type: str = "text/plain; charset=utf-8",
) -> Response:
    """A short HTTP response that refuses (or answers) a request on the control port."""
    body = (text + "\n").encode()
    all_headers = Headers(
        {
            "Content-Type": content_type,
            "Content-Length": str(len(body)),
            "Connection": "close",
        }
    )
    for name, value in (headers or {}).items():
        all_headers[name] = value
    return Response(status, HTTPStatus(status).phrase, all_headers, body)


def refused_status(exc: BaseException) -> tuple[int, bytes] | None:
    """The status and body of a handshake the server refused, if that is what ``exc`` is."""
    if isinstance(exc, InvalidStatus):
        return exc.response.status_code, bytes(exc.response.body or b"")
    return None
