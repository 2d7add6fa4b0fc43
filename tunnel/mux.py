"""The stream multiplexer: many streams over one ordered message channel.

Theory of operation
-------------------
One :class:`Multiplexer` is one side of one session. It is sans-I/O: it
never touches a socket, a task or a clock. The session feeds it each
websocket message with :meth:`~Multiplexer.receive_data` and gets back
events (:mod:`tunnel.events`); it asks for the bytes to send with
:meth:`~Multiplexer.data_to_send`; and it calls :meth:`~Multiplexer.handle_timer`
with the current time whenever :meth:`~Multiplexer.next_deadline` passes.

Streams. Each stream has a state from :data:`TRANSITIONS`, the same table
as protocol.md §5 (a test keeps the two in sync). The side that dialled the
session (the client) numbers its streams odd, the other side even. Ids only
grow. Every violation by the peer raises :class:`ProtocolError`, which ends
the session: frames cannot be resynchronised and a peer that breaks the
rules once cannot be trusted with the other streams.

Flow control. Each direction of each stream has a credit window (protocol.md
§6). Writes are always accepted and buffered here, per stream; DATA frames
leave only as credit allows, so a stream whose reader stalls holds at most
its buffer plus one window, and :meth:`data_to_send` serves the streams that
have credit round-robin, one frame each per round, so one busy stream never
starves the others. Credit returns when the consumer calls
:meth:`acknowledge`, not when bytes arrive.

A window grows when it, not the reader, holds a stream back (protocol.md
§6): once two PINGs have measured a round trip of at least
:data:`AUTOTUNE_FROM_ROUND_TRIP_S`, a stream whose consumer read a quarter
of its window within two round trips gets its window doubled with its next
WINDOW_UPDATE, up to :data:`MAX_AUTOTUNED_WINDOW_BYTES`, and all of a
session's windows together grow by at most
:data:`SESSION_WINDOW_GROWTH_BYTES`. A reader that stalls never grows its
window, so what a stalled stream holds stays bounded.

Liveness. Every ``heartbeat_interval_s`` a PING goes out; a peer that sends
nothing at all for ``heartbeat_timeout_s`` is declared dead with a
:class:`~tunnel.events.HeartbeatTimedOut` event. The answers give the
round trip (:attr:`Multiplexer.path_round_trip_s`, the shortest of the last
:data:`ROUND_TRIP_SAMPLES`, once two are in).

Time. The multiplexer reads no clock: :attr:`Multiplexer.now` is the
caller's time, set before each message it is fed and at each
:meth:`~Multiplexer.handle_timer`.

Closed streams. Frames can cross an RST on the wire, so frames for streams
closed recently are ignored, except DATA the peer could not legally have
sent. Frames for stream ids never opened are protocol errors.
"""

from __future__ import annotations

import collections
import enum
import math
import struct
from dataclasses import dataclass
from typing import Any, Final

from tunnel import events as ev
from tunnel.errors import ErrorCode, ProtocolError, StreamClosed
from tunnel.frames import (
    ABSOLUTE_MAX_PAYLOAD_BYTES,
    HEADER_SIZE,
    MAX_STREAM_ID,
    MAX_WINDOW_BYTES,
    TCP_ROUTE_PREFIX,
    Data,
    FrameDecoder,
    FrameType,
    GoAway,
    Hello,
    Open,
    Ping,
    Rst,
    WindowUpdate,
    data_header,
    encode,
)
from tunnel.window import UPDATE_THRESHOLD_DIVISOR, ReceiveWindow

PROTOCOL_VERSION: Final = 1

# Measured on loopback (docs/performance.md): a 256 KiB window capped a
# download at ~135 MB/s, waiting for credit every 64 KiB; 1 MiB with 256 KiB
# frames reached ~230 MB/s and halved the exit server's CPU per GiB; 4 MiB
# added nothing. The window is also what a stalled reader holds per stream.
DEFAULT_WINDOW_BYTES: Final = 1024 * 1024
DEFAULT_MAX_FRAME_BYTES: Final = 256 * 1024
DEFAULT_MAX_MESSAGE_BYTES: Final = 1024 * 1024
DEFAULT_MAX_CONCURRENT_STREAMS: Final = 16384
DEFAULT_HEARTBEAT_INTERVAL_S: Final = 10.0
DEFAULT_HEARTBEAT_TIMEOUT_S: Final = 20.0
#: Auto-tuning (module docstring): the largest a stream's receive window grows
#: to, and how much a session's windows may grow in all. 16 MiB carries 130
#: Mbit/s over a 1 s round trip; 64 MiB is the most this side holds beyond
#: the initial windows when fast readers stall.
MAX_AUTOTUNED_WINDOW_BYTES: Final = 16 * 1024 * 1024
SESSION_WINDOW_GROWTH_BYTES: Final = 64 * 1024 * 1024
#: Windows grow only over a round trip at least this long: below it the
#: initial window already carries 400 Mbit/s, and two processes on one
#: busy machine can take a few milliseconds to answer each other.
AUTOTUNE_FROM_ROUND_TRIP_S: Final = 0.020
#: The round trip is the shortest of the last this many PINGs (30 s of
#: heartbeats), and known once two have been answered: one queued behind a
#: transfer, or answered by a peer still busy starting, measures the queue,
#: not the path; a path that changed is followed within a few heartbeats.
ROUND_TRIP_SAMPLES: Final = 3
#: Rapid-reset guard: more streams refused, or opened and reset by the peer
#: before it sent any DATA on them, than this in one rate window ends the
#: session with ENHANCE_YOUR_CALM (protocol.md §9). A stream reset after it
#: carried data is an exchange its visitor abandoned; counting those let any
#: visitor who drops requests fast enough take the whole tunnel down.
DEFAULT_MAX_RESETS_PER_WINDOW: Final = 2000
RATE_WINDOW_S: Final = 10.0
#: How many closed stream ids are remembered to tell a race from a violation.
RECENTLY_CLOSED_CAPACITY: Final = 4096

_PING_OPAQUE = struct.Struct("!Q")


class Role(enum.Enum):
    """Which end of the session this is."""

    CLIENT = "client"  #: dialled the websocket; opens odd stream ids
    SERVER = "server"  #: accepted the websocket; opens even stream ids


# IntEnums, not Enums: the transition table is keyed by pairs of them, and a
# plain Enum hashes in Python (twice the cost of a lookup).
class StreamState(enum.IntEnum):
    IDLE = 0
    OPEN = 1
    HALF_CLOSED_LOCAL = 2
    HALF_CLOSED_REMOTE = 3
    CLOSED = 4


class StreamInput(enum.IntEnum):
    SEND_OPEN = 0
    RECV_OPEN = 1
    SEND_DATA = 2
    RECV_DATA = 3
    SEND_END = 4
    RECV_END = 5
    SEND_RST = 6
    RECV_RST = 7
    RECV_WINDOW_UPDATE = 8


_S = StreamState
_I = StreamInput

#: The stream state machine (protocol.md §5). A pair missing here is illegal.
TRANSITIONS: Final[dict[tuple[StreamState, StreamInput], StreamState]] = {
    (_S.IDLE, _I.SEND_OPEN): _S.OPEN,
    (_S.IDLE, _I.RECV_OPEN): _S.OPEN,
    (_S.OPEN, _I.SEND_DATA): _S.OPEN,
    (_S.OPEN, _I.RECV_DATA): _S.OPEN,
    (_S.OPEN, _I.SEND_END): _S.HALF_CLOSED_LOCAL,
    (_S.OPEN, _I.RECV_END): _S.HALF_CLOSED_REMOTE,
    (_S.OPEN, _I.SEND_RST): _S.CLOSED,
    (_S.OPEN, _I.RECV_RST): _S.CLOSED,
    (_S.OPEN, _I.RECV_WINDOW_UPDATE): _S.OPEN,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_DATA): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_END): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _I.SEND_RST): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_RST): _S.CLOSED,
    (_S.HALF_CLOSED_LOCAL, _I.RECV_WINDOW_UPDATE): _S.HALF_CLOSED_LOCAL,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_DATA): _S.HALF_CLOSED_REMOTE,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_END): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.SEND_RST): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.RECV_RST): _S.CLOSED,
    (_S.HALF_CLOSED_REMOTE, _I.RECV_WINDOW_UPDATE): _S.HALF_CLOSED_REMOTE,
    # Both sides ended but our last bytes still wait for credit: a reset drops them.
    (_S.CLOSED, _I.SEND_RST): _S.CLOSED,
    (_S.CLOSED, _I.RECV_RST): _S.CLOSED,
    (_S.CLOSED, _I.RECV_WINDOW_UPDATE): _S.CLOSED,
}

#: States in which the peer may still send DATA, so credit is worth returning.
_PEER_MAY_SEND: Final = frozenset({_S.OPEN, _S.HALF_CLOSED_LOCAL})
_WINDOW_UPDATE_HEADER: Final = struct.Struct("!BBIII")


def _window_update(stream_id: int, increment: int) -> bytes:
    return _WINDOW_UPDATE_HEADER.pack(FrameType.WINDOW_UPDATE, 0, stream_id, 4, increment)


# DATA leaves a stream's state as it is; on the hot path a set membership
# test, derived from the table, stands in for the lookup.
_CAN_SEND_DATA: Final = frozenset(s for (s, i), n in TRANSITIONS.items() if i is _I.SEND_DATA)
_CAN_RECV_DATA: Final = frozenset(s for (s, i), n in TRANSITIONS.items() if i is _I.RECV_DATA)
assert all(TRANSITIONS[s, _I.SEND_DATA] is s for s in _CAN_SEND_DATA)
assert all(TRANSITIONS[s, _I.RECV_DATA] is s for s in _CAN_RECV_DATA)


@dataclass(frozen=True, slots=True)
class Settings:
    """What one side announces in its HELLO (protocol.md §4.7)."""

    #: credit each new stream starts with, in the direction towards us
    initial_window_bytes: int = DEFAULT_WINDOW_BYTES
    #: largest frame payload we accept
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    #: streams the peer may have open towards us at once (0: the peer opens none)
    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS

    def __post_init__(self) -> None:
        if not 1024 <= self.initial_window_bytes <= MAX_WINDOW_BYTES:
            raise ValueError("initial_window_bytes out of range")
        if not 1024 <= self.max_frame_bytes <= ABSOLUTE_MAX_PAYLOAD_BYTES:
            raise ValueError("max_frame_bytes out of range")
        if not 0 <= self.max_concurrent_streams <= MAX_STREAM_ID:
            raise ValueError("max_concurrent_streams out of range")

    def to_hello(self) -> dict[str, int]:
        return {
            "initial_window_bytes": self.initial_window_bytes,
            "max_frame_bytes": self.max_frame_bytes,
            "max_concurrent_streams": self.max_concurrent_streams,
        }

    @classmethod
    def from_hello(cls, fields: dict[str, Any]) -> Settings:
        """Read the peer's settings from its HELLO.

        Raises:
            ProtocolError: a setting is missing, not an integer, or out of range.
        """
        values: dict[str, int] = {}
        for name in ("initial_window_bytes", "max_frame_bytes", "max_concurrent_streams"):
            value = fields.get(name)
            if type(value) is not int:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"HELLO setting {name} is invalid")
            values[name] = value
        try:
            return cls(**values)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"HELLO settings: {exc}") from None


@dataclass(frozen=True, slots=True)
class MuxStatistics:
    """A snapshot of the multiplexer's state; all zero when no stream is open."""

    open_streams: int
    local_streams: int
    remote_streams: int
    buffered_send_bytes: int
    held_receive_bytes: int
    queued_control_frames: int


class _Stream:
    """What the multiplexer knows of one stream."""

    __slots__ = (
        "carried_data",
        "end_queued",
        "local",
        "outbox",
        "outbox_bytes",
        "recv",
        "route",
        "send_window",
        "state",
        "stream_id",
    )

    def __init__(
        self, stream_id: int, route: str, *, local: bool, send_window: int, recv_window: int
    ) -> None:
        self.stream_id = stream_id
        self.route = route
        self.local = local
        self.state = StreamState.IDLE
        self.send_window = send_window
        self.recv = ReceiveWindow(recv_window)
        self.outbox: collections.deque[bytes | memoryview] = collections.deque()
        self.outbox_bytes = 0
        self.end_queued = False
        #: the peer sent DATA on it: a reset after that is an exchange abandoned
        #: (its visitor went away), not the open-and-reset churn the guard counts
        self.carried_data = False


class Multiplexer:
    """One side of a session's stream multiplexing (see the module docstring)."""

    def __init__(
        self,
        role: Role,
        settings: Settings | None = None,
        *,
        heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
        heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
        max_resets_per_window: int = DEFAULT_MAX_RESETS_PER_WINDOW,
        now: float = 0.0,
    ) -> None:
        self.role = role
        self.local_settings = settings or Settings()
        self.remote_settings: Settings | None = None
        self._decoder = FrameDecoder(self.local_settings.max_frame_bytes)
        self._streams: dict[int, _Stream] = {}
        self._local_parity = 1 if role is Role.CLIENT else 0
        self._next_local_id = 1 if role is Role.CLIENT else 2
        self._last_remote_id = 0
        self._remote_streams = 0
        # stream id -> whether the peer may still legally send DATA on it
        self._recently_closed: collections.OrderedDict[int, bool] = collections.OrderedDict()
        self._control: collections.deque[bytes] = collections.deque()
        self._ready: dict[int, None] = {}
        self._hello_sent = False
        self._hello_received = False
        self.local_going_away = False
        self.remote_going_away = False
        # heartbeat and rate bookkeeping, all in the caller's clock
        self._heartbeat_interval_s = heartbeat_interval_s
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self._frames_received = 0
        self._frames_seen_at_last_timer = 0
        self._last_received_at = now
        self._next_ping_at = now + heartbeat_interval_s
        self._pings_sent_at: dict[int, float] = {}
        self._ping_counter = 0
        self._max_resets_per_window = max_resets_per_window
        self._resets_in_window = 0
        self._rate_window_ends_at = now + RATE_WINDOW_S
        #: the caller's clock as of the last message fed or timer handled
        self.now = now
        #: the shortest round trip of the last PINGs, in seconds; inf until two
        self.path_round_trip_s = math.inf
        self._round_trips: collections.deque[float] = collections.deque(maxlen=ROUND_TRIP_SAMPLES)
        #: what the windows of this session may still grow by (auto-tuning)
        self._growth_left = SESSION_WINDOW_GROWTH_BYTES

    # ------------------------------------------------------------------ intents

    def send_hello(self, extra: dict[str, Any] | None = None) -> None:
        """Queue our HELLO: the protocol version, our settings and ``extra`` fields.

        Raises:
            ProtocolError: HELLO was already sent.
        """
        if self._hello_sent:
            raise ProtocolError(ErrorCode.INTERNAL_ERROR, "HELLO sent twice")
        fields: dict[str, Any] = dict(extra or {})
        fields.update(self.local_settings.to_hello(), version=PROTOCOL_VERSION)
        self._control.append(encode(Hello(fields)))
        self._hello_sent = True

    def open_stream(self, route: str) -> int:
        """Open a stream to the peer's upstream for ``route``; return its id.

        Raises:
            StreamClosed: REFUSED_STREAM when the session is going away (as it
                is once its last stream id is used) or the peer's stream
                limit is reached.
        """
        if not (self._hello_sent and self._hello_received):
            raise StreamClosed(0, ErrorCode.PROTOCOL_ERROR, "stream opened before HELLO")
        assert self.remote_settings is not None
        if self.local_going_away or self.remote_going_away:
            raise StreamClosed(0, ErrorCode.REFUSED_STREAM, "session is going away")
        if self._local_stream_count() >= self.remote_settings.max_concurrent_streams:
            raise StreamClosed(0, ErrorCode.REFUSED_STREAM, "peer's stream limit reached")
        stream_id = self._next_local_id
        self._next_local_id += 2
        stream = _Stream(
            stream_id,
            route,
            local=True,
            send_window=self.remote_settings.initial_window_bytes,
            recv_window=self.local_settings.initial_window_bytes,
        )
        self._transition(stream, StreamInput.SEND_OPEN)
        self._streams[stream_id] = stream
        self._control.append(encode(Open(stream_id, route)))
        if self._next_local_id > MAX_STREAM_ID:
            # That was our last id: the peer opens a new session (protocol.md §5.1).
            self.go_away(ErrorCode.NO_ERROR, "stream ids exhausted")
        return stream_id

    def send_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, *, end_stream: bool = False
    ) -> None:
        """Queue bytes on a stream; they leave as the peer's credit allows.

        Raises:
            StreamClosed: the stream is unknown or we already ended or reset it.
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamClosed(stream_id, ErrorCode.STREAM_CLOSED, "stream is closed")
        if data:
            if stream.state not in _CAN_SEND_DATA:
                self._transition(stream, StreamInput.SEND_DATA)  # raises, naming the state
            chunk = bytes(data) if isinstance(data, bytearray) else data
            stream.outbox.append(chunk)
            stream.outbox_bytes += len(chunk)
            if stream.send_window > 0:
                self._ready[stream_id] = None
        if end_stream:
            self.end_stream(stream_id)

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side after the bytes already queued.

        Raises:
            StreamClosed: the stream is unknown or we already ended or reset it.
        """
        stream = self._local_stream(stream_id)
        self._transition(stream, StreamInput.SEND_END)
        stream.end_queued = True
        self._ready[stream_id] = None

    def reset_stream(self, stream_id: int, code: ErrorCode = ErrorCode.CANCEL) -> None:
        """Abort a stream in both directions, dropping what is still buffered.

        Resetting a stream that is already gone does nothing.
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        self._transition(stream, StreamInput.SEND_RST)
        self._control.append(encode(Rst(stream_id, code)))
        self._forget(stream, peer_may_send_data=True)

    def acknowledge(self, stream_id: int, length: int) -> None:
        """The consumer has read ``length`` bytes of the stream: return the credit.

        Acknowledging a stream that is already gone does nothing.
        """
        stream = self._streams.get(stream_id)
        if stream is None or length <= 0:
            return
        recv = stream.recv
        if length > recv.held:
            recv.consume(length)  # raises: a local bug
        # ReceiveWindow.consume, inline: this runs for every delivery.
        recv.held -= length
        unacknowledged = recv.unacknowledged + length
        if unacknowledged < recv.threshold:
            recv.unacknowledged = unacknowledged
            return
        recv.unacknowledged = 0
        if stream.state in _PEER_MAY_SEND:
            if AUTOTUNE_FROM_ROUND_TRIP_S <= self.path_round_trip_s < math.inf:
                unacknowledged += self._grow(recv)
            self._control.append(_window_update(stream_id, unacknowledged))
        recv.available += unacknowledged

    def _grow(self, recv: ReceiveWindow) -> int:
        """Extra credit for a window that, not its reader, holds the stream back.

        A quarter of the window read within two round trips since the last
        update means the window is under eight times what the path carries
        per round trip, and the sender may wait for credit: the window
        doubles (the increment carries the difference), within the
        per-stream and the session's limits. Returns the extra credit, 0
        for none.
        """
        now = self.now
        quick = now - recv.updated_at < 2.0 * self.path_round_trip_s
        recv.updated_at = now
        extra = recv.size
        if not quick or recv.size + extra > MAX_AUTOTUNED_WINDOW_BYTES:
            return 0
        if extra > self._growth_left:
            return 0
        self._growth_left -= extra
        recv.size += extra
        recv.threshold = recv.size // UPDATE_THRESHOLD_DIVISOR
        return extra

    def go_away(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Tell the peer we open no new streams and accept none; open ones go on."""
        if self.local_going_away:
            return
        self.local_going_away = True
        self._control.append(encode(GoAway(self._last_remote_id, code, reason)))

    # ----------------------------------------------------------------- output

    @property
    def has_data_to_send(self) -> bool:
        """Whether :meth:`data_to_send` would return bytes."""
        return bool(self._control) or bool(self._ready)

    def data_to_send(self, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> bytes:
        """Frames to put in the next message, at most ``max_bytes`` (but at least one frame).

        Control frames first, then DATA round-robin over the streams that have
        both bytes and credit. Returns ``b""`` when there is nothing to send.
        """
        return b"".join(self.message_parts(max_bytes))

    def message_parts(self, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[bytes | memoryview]:
        """:meth:`data_to_send`, as the pieces it would join: headers and payload slices.

        The websocket layer writes them out without joining them first (a
        copy of every payload byte, docs/performance.md). The list is empty
        when there is nothing to send.
        """
        parts: list[bytes | memoryview] = []
        budget = max_bytes
        control = self._control
        while control and (budget >= len(control[0]) or not parts):
            frame = control.popleft()
            parts.append(frame)
            budget -= len(frame)
        if control:
            # DATA never overtakes a control frame: a stream's OPEN must
            # reach the peer before its first bytes do.
            return parts
        assert self.remote_settings is not None or not self._ready
        max_frame = self.remote_settings.max_frame_bytes if self.remote_settings else 0
        ready = self._ready
        while ready and budget > HEADER_SIZE:
            for stream_id in list(ready):
                if budget <= HEADER_SIZE:
                    break
                stream = self._streams[stream_id]
                # Two-argument min()s: compiled, a min() of more is a generic call.
                length = min(
                    min(stream.outbox_bytes, stream.send_window),
                    min(max_frame, budget - HEADER_SIZE),
                )
                end = stream.end_queued and length == stream.outbox_bytes
                if length == 0 and not end:
                    del ready[stream_id]
                    continue
                parts.append(data_header(stream_id, length, end_stream=end))
                if length:
                    self._take(stream, length, parts)
                budget -= HEADER_SIZE + length
                if end:
                    stream.end_queued = False
                    del ready[stream_id]
                    if stream.state is StreamState.CLOSED:
                        self._forget(stream, peer_may_send_data=False)
                elif stream.outbox_bytes == 0 or stream.send_window == 0:
                    del ready[stream_id]
        return parts

    @staticmethod
    def _take(stream: _Stream, length: int, parts: list[bytes | memoryview]) -> None:
        stream.send_window -= length
        stream.outbox_bytes -= length
        outbox = stream.outbox
        while length:
            chunk = outbox[0]
            size = len(chunk)
            if size <= length:
                outbox.popleft()
                parts.append(chunk)
                length -= size
            else:
                view = memoryview(chunk)
                parts.append(view[:length])
                outbox[0] = view[length:]
                length = 0

    # ------------------------------------------------------------------ input

    def receive_data(self, message: bytes) -> list[ev.Event]:
        """Feed one message from the peer; return what it means.

        Raises:
            ProtocolError: the peer broke the protocol; end the session with
                the error's code.
        """
        frames = self._decoder.decode_message(message)
        self._frames_received += len(frames)
        events: list[ev.Event] = []
        if not self._hello_received:
            if not frames:
                return events
            first = frames[0]
            if not isinstance(first, Hello):
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"expected HELLO, got {first}")
            events.append(self._receive_hello(first))
            frames = frames[1:]
        for frame in frames:
            if type(frame) is Data:
                self._receive_data_frame(frame, events)
            elif isinstance(frame, WindowUpdate):
                self._receive_window_update(frame, events)
            elif isinstance(frame, Open):
                self._receive_open(frame, events)
            elif isinstance(frame, Rst):
                self._receive_rst(frame, events)
            elif isinstance(frame, Ping):
                self._receive_ping(frame, events)
            elif isinstance(frame, GoAway):
                self._receive_go_away(frame, events)
            else:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "HELLO received twice")
        return events

    def _receive_hello(self, frame: Hello) -> ev.HelloReceived:
        version = frame.fields.get("version")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR,
                f"peer speaks protocol version {version!r}; this side speaks {PROTOCOL_VERSION}",
            )
        self.remote_settings = Settings.from_hello(frame.fields)
        self._hello_received = True
        return ev.HelloReceived(frame.fields)

    def _receive_data_frame(self, frame: Data, events: list[ev.Event]) -> None:
        stream_id = frame.stream_id
        stream = self._streams.get(stream_id)
        if stream is None:
            self._frame_for_closed_stream(stream_id, "DATA", is_data=True)
            return
        data = frame.data
        length = len(data)
        if (length or not frame.end_stream) and stream.state not in _CAN_RECV_DATA:
            self._transition(stream, StreamInput.RECV_DATA)  # raises, naming the state
        recv = stream.recv
        if length > recv.available:
            recv.receive(stream_id, length)  # raises FLOW_CONTROL_ERROR
        recv.available -= length
        recv.held += length
        if length:
            stream.carried_data = True
            events.append(ev.DataReceived(stream_id, data))
        if frame.end_stream:
            self._transition(stream, StreamInput.RECV_END)
            events.append(ev.StreamEnded(stream_id))
            if stream.state is StreamState.CLOSED and not stream.end_queued:
                self._forget(stream, peer_may_send_data=False)

    def _receive_window_update(self, frame: WindowUpdate, events: list[ev.Event]) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            self._frame_for_closed_stream(frame.stream_id, "WINDOW_UPDATE", is_data=False)
            return
        self._transition(stream, StreamInput.RECV_WINDOW_UPDATE)
        window = stream.send_window + frame.increment
        if window > MAX_WINDOW_BYTES:
            raise ProtocolError(
                ErrorCode.FLOW_CONTROL_ERROR, f"stream {frame.stream_id}: window above 2^31-1"
            )
        stream.send_window = window
        if stream.outbox_bytes:
            self._ready[frame.stream_id] = None
        events.append(ev.WindowUpdated(frame.stream_id, frame.increment))

    def _receive_open(self, frame: Open, events: list[ev.Event]) -> None:
        stream_id = frame.stream_id
        if stream_id % 2 == self._local_parity or stream_id <= self._last_remote_id:
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR,
                f"OPEN with stream id {stream_id}: wrong parity or not increasing",
            )
        if self.local_settings.max_concurrent_streams == 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "peer may not open streams")
        self._last_remote_id = stream_id
        if (
            self.local_going_away
            or self._remote_streams >= self.local_settings.max_concurrent_streams
        ):
            self._control.append(encode(Rst(stream_id, ErrorCode.REFUSED_STREAM)))
            self._remember_closed(stream_id, peer_may_send_data=True)
            self._count_reset()
            return
        assert self.remote_settings is not None
        stream = _Stream(
            stream_id,
            frame.route,
            local=False,
            send_window=self.remote_settings.initial_window_bytes,
            recv_window=self.local_settings.initial_window_bytes,
        )
        self._transition(stream, StreamInput.RECV_OPEN)
        self._streams[stream_id] = stream
        self._remote_streams += 1
        events.append(ev.StreamOpened(stream_id, frame.route))

    def _receive_rst(self, frame: Rst, events: list[ev.Event]) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            self._frame_for_closed_stream(frame.stream_id, "RST", is_data=False)
            return
        self._transition(stream, StreamInput.RECV_RST)
        if (
            not stream.local
            and not stream.carried_data
            and not stream.route.startswith(TCP_ROUTE_PREFIX)
        ):
            # A raw TCP stream is a visitor's connection, which may go before
            # either side sent a byte: that is no rapid reset (protocol.md §9).
            self._count_reset()
        self._forget(stream, peer_may_send_data=False)
        events.append(ev.StreamReset(frame.stream_id, frame.code))

    def _receive_ping(self, frame: Ping, events: list[ev.Event]) -> None:
        if not frame.ack:
            self._control.append(encode(Ping(frame.opaque, ack=True)))
            return
        (counter,) = _PING_OPAQUE.unpack(frame.opaque)
        sent_at = self._pings_sent_at.pop(counter, None)
        if sent_at is not None:
            samples = self._round_trips
            samples.append(max(0.0, self.now - sent_at))
            if len(samples) < 2:
                self.measure_round_trip()  # a second opinion, at once
            else:
                self.path_round_trip_s = min(samples)
            events.append(ev.PingAcknowledged(sent_at))

    def _receive_go_away(self, frame: GoAway, events: list[ev.Event]) -> None:
        self.remote_going_away = True
        # Streams we opened above the peer's last handled id were never seen:
        # they fail as REFUSED_STREAM, which callers may safely retry.
        for stream_id in [s for s in self._streams if s > frame.last_stream_id]:
            stream = self._streams[stream_id]
            if stream.local:
                self._forget(stream, peer_may_send_data=False)
                events.append(ev.StreamReset(stream_id, ErrorCode.REFUSED_STREAM))
        events.append(ev.GoAwayReceived(frame.last_stream_id, frame.code, frame.reason))

    def _frame_for_closed_stream(self, stream_id: int, name: str, *, is_data: bool) -> None:
        """A frame arrived for a stream not in the table: a race, or a violation."""
        peer_may_send_data = self._recently_closed.get(stream_id)
        if peer_may_send_data is not None:
            if is_data and not peer_may_send_data:
                raise ProtocolError(
                    ErrorCode.STREAM_CLOSED, f"{name} on stream {stream_id} after it closed"
                )
            return
        local = stream_id % 2 == self._local_parity
        never_opened = (
            stream_id >= self._next_local_id if local else stream_id > self._last_remote_id
        )
        if never_opened:
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"{name} on stream {stream_id}, which was never opened"
            )
        # Closed long ago: beyond what we remember, a late frame is tolerated.

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> float:
        """When :meth:`handle_timer` must next be called, in the caller's clock."""
        return min(
            self._next_ping_at,
            self._last_received_at + self._heartbeat_timeout_s,
            self._rate_window_ends_at,
        )

    def handle_timer(self, now: float) -> list[ev.Event]:
        """Send heartbeats, detect a silent peer, roll the rate window."""
        self.now = now
        if self._frames_received != self._frames_seen_at_last_timer:
            self._frames_seen_at_last_timer = self._frames_received
            self._last_received_at = now
        silent_s = now - self._last_received_at
        if silent_s >= self._heartbeat_timeout_s:
            return [ev.HeartbeatTimedOut(silent_s)]
        if now >= self._next_ping_at and self._hello_sent:
            self.measure_round_trip()
            self._next_ping_at = now + self._heartbeat_interval_s
        if now >= self._rate_window_ends_at:
            self._resets_in_window = 0
            self._rate_window_ends_at = now + RATE_WINDOW_S
        return []

    def measure_round_trip(self) -> None:
        """Send a PING now; its answer may lower :attr:`path_round_trip_s`.

        The heartbeat sends one every interval; the session sends one more as
        it starts, and the first answer sends a second, so that windows can
        grow (auto-tuning) from the first transfer rather than two heartbeat
        intervals later.
        """
        if not self._hello_sent:
            return
        self._ping_counter += 1
        self._pings_sent_at = {self._ping_counter: self.now}  # only the latest is waited for
        self._control.append(encode(Ping(_PING_OPAQUE.pack(self._ping_counter))))

    # --------------------------------------------------------------- queries

    def buffered_bytes(self, stream_id: int) -> int:
        """Bytes queued on a stream and not yet sent (0 for unknown streams)."""
        stream = self._streams.get(stream_id)
        return stream.outbox_bytes if stream is not None else 0

    def receive_window_size(self, stream_id: int) -> int:
        """The window we grant the peer on a stream, as grown (0 for unknown streams)."""
        stream = self._streams.get(stream_id)
        return stream.recv.size if stream is not None else 0

    def send_window(self, stream_id: int) -> int:
        """Credit the peer has granted us on a stream (0 for unknown streams)."""
        stream = self._streams.get(stream_id)
        return stream.send_window if stream is not None else 0

    def stream_state(self, stream_id: int) -> StreamState:
        """The state of a stream; CLOSED once it has left the table."""
        stream = self._streams.get(stream_id)
        return stream.state if stream is not None else StreamState.CLOSED

    def statistics(self) -> MuxStatistics:
        local = sum(1 for s in self._streams.values() if s.local)
        return MuxStatistics(
            open_streams=len(self._streams),
            local_streams=local,
            remote_streams=len(self._streams) - local,
            buffered_send_bytes=sum(s.outbox_bytes for s in self._streams.values()),
            held_receive_bytes=sum(s.recv.held for s in self._streams.values()),
            queued_control_frames=len(self._control),
        )

    # -------------------------------------------------------------- internals

    def _local_stream(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamClosed(stream_id, ErrorCode.STREAM_CLOSED, "stream is closed")
        return stream

    def _local_stream_count(self) -> int:
        return len(self._streams) - self._remote_streams

    @staticmethod
    def _transition(stream: _Stream, event: StreamInput) -> None:
        new_state = TRANSITIONS.get((stream.state, event))
        if new_state is None:
            message = f"{event.name} in state {stream.state.name}"
            if event.name.startswith("RECV"):
                raise ProtocolError(
                    ErrorCode.STREAM_CLOSED, f"stream {stream.stream_id}: {message}"
                )
            raise StreamClosed(stream.stream_id, ErrorCode.STREAM_CLOSED, message)
        stream.state = new_state

    def _forget(self, stream: _Stream, *, peer_may_send_data: bool) -> None:
        if self._streams.pop(stream.stream_id, None) is None:
            return
        self._growth_left += stream.recv.size - self.local_settings.initial_window_bytes
        if not stream.local:
            self._remote_streams -= 1
        self._ready.pop(stream.stream_id, None)
        stream.outbox.clear()
        stream.outbox_bytes = 0
        self._remember_closed(stream.stream_id, peer_may_send_data=peer_may_send_data)

    def _remember_closed(self, stream_id: int, *, peer_may_send_data: bool) -> None:
        closed = self._recently_closed
        closed[stream_id] = peer_may_send_data
        if len(closed) > RECENTLY_CLOSED_CAPACITY:
            closed.popitem(last=False)

    def _count_reset(self) -> None:
        self._resets_in_window += 1
        if self._resets_in_window > self._max_resets_per_window:
            raise ProtocolError(
                ErrorCode.ENHANCE_YOUR_CALM,
                f"more than {self._max_resets_per_window} streams reset or refused "
                f"in {RATE_WINDOW_S:.0f} s",
            )
