"""The asyncio session: drives a :class:`~tunnel.mux.Multiplexer` over one websocket.

The session runs no task of its own. The websocket connection
(:mod:`tunnel.websocket`) calls :meth:`Session.message_received` from its
``data_received``, and the session feeds the multiplexer and calls stream
handlers back in that same callback. What the multiplexer has to send is
flushed by one ``call_soon`` per loop iteration, so everything written in
the meantime (by every stream) leaves in one message, or in several when a
burst queues more than :data:`FLUSH_AFTER_QUEUED` frames: the peer starts
on the first while we read the rest. The heartbeat is a ``call_at`` timer.

Streams have no task either: like asyncio transports they call a
:class:`StreamHandler` back, and the handler applies backpressure with
:meth:`Stream.pause_reading` and reacts to
:meth:`StreamHandler.pause_writing`. So a forwarder pipes a TCP connection
into a stream with callbacks only, and a slow consumer never holds up the
session: what it has not read stays within its window (protocol.md §6).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from mypy_extensions import mypyc_attr

from tunnel import events as ev
from tunnel.errors import (
    ErrorCode,
    ProtocolError,
    SessionClosed,
    StreamClosed,
    StreamReset,
    TunnelError,
)
from tunnel.mux import DEFAULT_MAX_MESSAGE_BYTES, Multiplexer
from tunnel.websocket import CLOSE_TIMEOUT_S, MessageHandler

logger = logging.getLogger("homeport.tunnel")

#: A stream's handler is paused when more than this is queued and not yet
#: sent, and resumed below the low mark: memory per stream stays bounded.
STREAM_WRITE_HIGH_WATER_BYTES: Final = 256 * 1024
STREAM_WRITE_LOW_WATER_BYTES: Final = 64 * 1024
#: Websocket messages we send are at most this big (the peer accepts 2 MiB).
MAX_MESSAGE_BYTES: Final = DEFAULT_MAX_MESSAGE_BYTES
#: What is queued leaves at the end of the loop iteration, in one message,
#: or as soon as this many frames were queued in the iteration: then the
#: peer starts on the first requests of a burst while we read the rest,
#: instead of both sides taking turns (docs/performance.md).
FLUSH_AFTER_QUEUED: Final = 32
HELLO_TIMEOUT_S: Final = 10.0
#: The reason a session going away gives as it ends, its last stream done.
DRAINED: Final = "drained"


class Channel(Protocol):
    """An ordered, reliable channel of binary messages: a websocket, or a test pair.

    It calls its ``handler`` (the session) back with what arrives; sends
    never block (a paused channel is one whose buffer is above its high mark).
    """

    handler: MessageHandler | None

    @property
    def paused(self) -> bool: ...

    def send_message(self, parts: Sequence[bytes | memoryview]) -> None:
        """Send one message, the concatenation of ``parts``."""

    def close(self, code: ErrorCode, reason: str) -> None: ...

    def abort(self) -> None: ...

    async def wait_closed(self) -> None: ...


@mypyc_attr(allow_interpreted_subclasses=True)  # subclassed where not compiled
class StreamHandler:
    """Callbacks for one stream, in the manner of :class:`asyncio.Protocol`.

    Subclass and override what you need. ``stream_closed`` is called exactly
    once, always from the event loop (never from inside a call you made on
    the stream), and no other callback follows it.
    """

    __slots__ = ()

    def data_received(self, data: bytes | memoryview) -> None:
        """Bytes arrived. Credit returns to the sender when this returns."""

    def eof_received(self) -> None:
        """The peer half-closed: no more bytes will arrive."""

    def stream_closed(self, exc: TunnelError | None) -> None:
        """The stream is over: ``None`` when both sides ended it, else why it failed."""

    def pause_writing(self) -> None:
        """Too much is queued on the stream: stop writing until :meth:`resume_writing`."""

    def resume_writing(self) -> None:
        """The queue drained: writing may go on."""


#: The handler of every closed stream, once its own was told.
_CLOSED: Final = StreamHandler()


class Stream:
    """One stream of a session, seen from this side; methods never block."""

    __slots__ = (
        "_closed",
        "_eof_pending",
        "_handler",
        "_inbox",
        "_local_ended",
        "_reading_paused",
        "_remote_ended",
        "_session",
        "_write_paused",
        "route",
        "stream_id",
    )

    def __init__(self, session: Session, stream_id: int, route: str, handler: StreamHandler):
        self._session = session
        self.stream_id = stream_id
        self.route = route
        self._handler = handler
        self._inbox: collections.deque[bytes | memoryview] = collections.deque()
        self._reading_paused = False
        self._write_paused = False
        self._eof_pending = False
        self._local_ended = False
        self._remote_ended = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<Stream {self.stream_id} route={self.route!r} session={self._session.name!r}>"

    @property
    def session(self) -> Session:
        return self._session

    @property
    def handler(self) -> StreamHandler:
        return self._handler

    def set_handler(self, handler: StreamHandler) -> None:
        """Hand the stream to a new handler (a pooled stream's next user)."""
        self._handler = handler

    def is_closing(self) -> bool:
        """Whether the stream was reset, closed, or ended on our side."""
        return self._closed or self._local_ended

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def remote_ended(self) -> bool:
        return self._remote_ended

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue bytes for the peer; the handler is paused if too much is queued.

        Writes on a stream that is already closed are dropped (its handler
        learns of the close from ``stream_closed``).

        Raises:
            StreamClosed: the stream was ended on our side with :meth:`write_eof`.
        """
        if self._closed or not data:
            return
        if self._local_ended:
            raise StreamClosed(self.stream_id, ErrorCode.STREAM_CLOSED, "write after write_eof")
        session = self._session
        session.mux.send_data(self.stream_id, data)
        session.bytes_written += len(data)
        session.flush_soon()
        if (
            not self._write_paused
            and session.mux.buffered_bytes(self.stream_id) > STREAM_WRITE_HIGH_WATER_BYTES
        ):
            self._write_paused = True
            session.paused_writers.add(self)
            self._call(self._handler.pause_writing)

    def write_eof(self) -> None:
        """Half-close: send what is queued, then tell the peer no more will follow."""
        if self._closed or self._local_ended:
            return
        self._local_ended = True
        self._session.mux.end_stream(self.stream_id)
        self._session.flush_soon()
        if self._remote_ended and not self._inbox:
            self._finish(None)

    def reset(self, code: ErrorCode = ErrorCode.CANCEL) -> None:
        """Abort the stream in both directions, dropping whatever is queued."""
        if self._closed:
            return
        self._session.mux.reset_stream(self.stream_id, code)
        self._session.flush_soon()
        self._finish(StreamReset(self.stream_id, code, remote=False))

    def pause_reading(self) -> None:
        """Stop delivering data; what arrives waits here and its credit is withheld."""
        self._reading_paused = True

    def resume_reading(self) -> None:
        """Deliver what waited and return its credit."""
        if not self._reading_paused:
            return
        self._reading_paused = False
        session = self._session
        session.mux.now = session._loop.time()  # the credit it returns may grow the window
        self._drain_inbox()
        session.flush_soon()

    def get_write_buffer_size(self) -> int:
        """Bytes queued on this stream and not yet sent."""
        return self._session.mux.buffered_bytes(self.stream_id)

    # -- called by the session ------------------------------------------------

    def _data_received(self, data: bytes | memoryview) -> None:
        if self._reading_paused or self._inbox:
            self._inbox.append(data)
            return
        self._deliver(data)

    def _deliver(self, data: bytes | memoryview) -> None:
        # The hot path of every byte received: _call() inlined.
        session = self._session
        length = len(data)
        session.bytes_read += length
        try:
            self._handler.data_received(data)
        except Exception:
            logger.exception("stream %d handler failed; resetting the stream", self.stream_id)
            self._reset_after_failure()
        session.mux.acknowledge(self.stream_id, length)

    def _drain_inbox(self) -> None:
        inbox = self._inbox
        while inbox and not self._reading_paused and not self._closed:
            self._deliver(inbox.popleft())
        if not inbox and self._eof_pending and not self._closed:
            self._eof_pending = False
            self._eof()

    def _eof_received(self) -> None:
        if self._inbox:
            self._eof_pending = True
            return
        self._eof()

    def _eof(self) -> None:
        self._remote_ended = True
        self._call(self._handler.eof_received)
        if self._local_ended and not self._closed:
            self._finish(None)

    def _resume_writing(self) -> None:
        self._write_paused = False
        self._call(self._handler.resume_writing)

    def _finish(self, exc: TunnelError | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._inbox.clear()
        session = self._session
        session.forget_stream(self)
        asyncio.get_running_loop().call_soon(self._tell_closed, self._handler, exc)

    def _tell_closed(self, handler: StreamHandler, exc: TunnelError | None) -> None:
        # No callback follows stream_closed, so the stream lets go of its
        # handler: a handler that points back at its stream (an exchange, a
        # forwarder, a pooled stream's keeper) is then freed by reference
        # counting, not left in a cycle for the collector.
        self._handler = _CLOSED
        self._call(handler.stream_closed, exc)

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        """Run a handler callback; a failing handler costs its own stream only."""
        try:
            callback(*args)
        except Exception:
            logger.exception("stream %d handler failed; resetting the stream", self.stream_id)
            self._reset_after_failure()

    def _reset_after_failure(self) -> None:
        if not self._closed:
            self.reset(ErrorCode.INTERNAL_ERROR)


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """How a session ended: the code, a reason, and whether the peer or the link ended it."""

    code: ErrorCode
    reason: str
    by_peer: bool


@dataclass(frozen=True, slots=True)
class SessionStatistics:
    streams: int
    paused_writers: int
    bytes_written: int
    bytes_read: int
    messages_sent: int
    messages_received: int
    round_trip_s: float | None


class Session:
    """One authenticated websocket carrying many streams.

    ``accept_stream`` is called for each stream the peer opens; it returns
    the handler, or resets the stream to refuse it.
    """

    def __init__(
        self,
        channel: Channel,
        mux: Multiplexer,
        *,
        name: str = "",
        accept_stream: Callable[[Stream], StreamHandler] | None = None,
        debug: bool = False,
    ) -> None:
        self.channel = channel
        self.mux = mux
        self.name = name
        self._accept_stream = accept_stream
        self._debug = debug
        self.streams: dict[int, Stream] = {}
        self.paused_writers: set[Stream] = set()
        self.bytes_written = 0
        self.bytes_read = 0
        self.messages_sent = 0
        self.messages_received = 0
        self.round_trip_s: float | None = None
        self.end: SessionEnd | None = None
        self.on_go_away: Callable[[ev.GoAwayReceived], None] | None = None
        self._loop = asyncio.get_running_loop()
        self._hello: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._done = asyncio.Event()
        self._closed = asyncio.Event()
        self._running = False
        self._pending_events: list[ev.Event] = []
        self._flush_handle: asyncio.Handle | None = None
        #: calls to flush_soon since the last flush
        self._queued_since_flush = 0
        self._timer: asyncio.TimerHandle | None = None
        self._protocol_error: ProtocolError | None = None
        channel.handler = self

    def __repr__(self) -> str:
        return f"<Session {self.name!r} streams={len(self.streams)}>"

    # -- what the channel calls ---------------------------------------------------------

    def message_received(self, message: bytes) -> None:
        if self.end is not None:
            return
        self.messages_received += 1
        mux = self.mux
        mux.now = self._loop.time()
        try:
            events = mux.receive_data(message)
        except ProtocolError as exc:
            logger.warning("! session %s: protocol error %s", self.name, exc)
            self._protocol_error = exc
            self._terminate(SessionEnd(exc.code, exc.message, by_peer=False))
            return
        for event in events:
            if self._running:
                self._dispatch(event)
            elif isinstance(event, ev.HelloReceived) and not self._hello.done():
                self._hello.set_result(event.fields)
            else:
                self._pending_events.append(event)
        if self.mux.has_data_to_send:
            self.flush_soon()

    def channel_closed(self, code: ErrorCode, reason: str) -> None:
        self._terminate(SessionEnd(code, reason, by_peer=True))

    def channel_paused(self) -> None:
        """The socket's buffer is full: stop sending until it drains."""

    def channel_resumed(self) -> None:
        self.flush_soon()

    # -- handshake -------------------------------------------------------------------

    async def send_hello(self, fields: dict[str, Any]) -> None:
        """Send our HELLO at once."""
        self.mux.send_hello(fields)
        self._flush()

    async def wait_hello(self, timeout_s: float = HELLO_TIMEOUT_S) -> dict[str, Any]:
        """Wait for the peer's HELLO, which must come first; return its fields.

        Raises:
            ProtocolError: the first frame was not a valid HELLO, or versions differ.
            SessionClosed: the channel closed or the HELLO took longer than ``timeout_s``.
        """
        ended: asyncio.Future[Any] = asyncio.ensure_future(self._done.wait())
        waiters: set[asyncio.Future[Any]] = {self._hello, ended}
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise SessionClosed(ErrorCode.PROTOCOL_ERROR, "no HELLO within timeout") from None
        finally:
            ended.cancel()
        if self._hello.done():
            return self._hello.result()
        if self._protocol_error is not None:
            raise self._protocol_error
        assert self.end is not None
        raise SessionClosed(self.end.code, self.end.reason)

    # -- streams -----------------------------------------------------------------------

    def open_stream(self, route: str, handler: StreamHandler) -> Stream:
        """Open a stream to the peer's upstream for ``route``.

        Raises:
            StreamClosed: the session is closing or the peer's stream limit is reached.
        """
        if self.end is not None:
            raise StreamClosed(0, ErrorCode.REFUSED_STREAM, "session is closed")
        stream_id = self.mux.open_stream(route)
        stream = Stream(self, stream_id, route, handler)
        self.streams[stream_id] = stream
        self.flush_soon()
        return stream

    def forget_stream(self, stream: Stream) -> None:
        streams = self.streams
        streams.pop(stream.stream_id, None)
        self.paused_writers.discard(stream)
        if not streams:
            self._end_if_drained()

    def flush_soon(self) -> None:
        """Send what the multiplexer has at the end of this loop iteration, or now.

        Now when :data:`FLUSH_AFTER_QUEUED` frames were queued since the
        flush was scheduled: a burst of requests read in one iteration goes
        out in several messages, and the peer works on the first while we
        read the others.
        """
        if self.end is not None:
            return
        self._queued_since_flush += 1
        handle = self._flush_handle
        if handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)
        elif self._queued_since_flush >= FLUSH_AFTER_QUEUED:
            handle.cancel()
            self._flush()

    def _flush(self) -> None:
        self._flush_handle = None
        self._queued_since_flush = 0
        channel = self.channel
        mux = self.mux
        while not channel.paused and (parts := mux.message_parts(MAX_MESSAGE_BYTES)):
            channel.send_message(parts)
            self.messages_sent += 1
        if self.paused_writers:
            self._resume_drained_writers()

    def _resume_drained_writers(self) -> None:
        buffered = self.mux.buffered_bytes
        for stream in list(self.paused_writers):
            if buffered(stream.stream_id) <= STREAM_WRITE_LOW_WATER_BYTES:
                self.paused_writers.discard(stream)
                stream._resume_writing()

    # -- lifecycle ---------------------------------------------------------------------------

    def go_away(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Announce that no new streams will be opened; open ones go on, then the session ends."""
        self.mux.go_away(code, reason)
        self.flush_soon()
        self._end_if_drained()

    def _end_if_drained(self) -> None:
        """End a session we sent away once it carries no stream (the peer waits for our close)."""
        if self.mux.local_going_away and self.end is None and not self.streams:
            self._terminate(SessionEnd(ErrorCode.GOING_AWAY, DRAINED, by_peer=False))

    @property
    def is_closing(self) -> bool:
        return self.end is not None or self.mux.local_going_away or self.mux.remote_going_away

    def close(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """End the session: GO_AWAY, then close the websocket. :meth:`run` returns."""
        self._terminate(SessionEnd(code, reason, by_peer=False))

    async def wait_closed(self) -> None:
        """Wait until :meth:`run` has finished and every stream was told."""
        await self._closed.wait()

    async def run(self) -> SessionEnd:
        """Carry streams until the session ends; return how it ended.

        Every stream still open is closed with :class:`SessionClosed`.
        """
        self._running = True
        try:
            pending, self._pending_events = self._pending_events, []
            for event in pending:
                self._dispatch(event)
            self._on_timer()
            self.mux.measure_round_trip()  # for the windows' auto-tuning, at once
            self.flush_soon()
            await self._done.wait()
            assert self.end is not None
            await self._shut_channel(self.end)
            return self.end
        finally:
            if self.end is None:  # cancelled from outside
                self.end = SessionEnd(ErrorCode.GOING_AWAY, "cancelled", by_peer=False)
                self.channel.abort()
            self._stop_timers()
            self._fail_streams(self.end)
            self._closed.set()

    def _terminate(self, end: SessionEnd) -> None:
        if self.end is None:
            self.end = end
            self._done.set()

    async def _shut_channel(self, end: SessionEnd) -> None:
        channel = self.channel
        if end.by_peer:
            if end.code is ErrorCode.HEARTBEAT_TIMEOUT:
                channel.abort()
            else:
                channel.close(end.code, end.reason)
        else:
            # Our decision: say why in a GO_AWAY, then close with the matching code.
            self.mux.go_away(end.code, end.reason)
            self._flush()
            channel.close(end.code, end.reason)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S + 1):
                await channel.wait_closed()

    def _stop_timers(self) -> None:
        for handle in (self._timer, self._flush_handle):
            if handle is not None:
                handle.cancel()
        self._timer = self._flush_handle = None

    def _fail_streams(self, end: SessionEnd) -> None:
        error = SessionClosed(end.code, end.reason)
        for stream in list(self.streams.values()):
            stream._finish(error)
        self.paused_writers.clear()

    def _on_timer(self) -> None:
        self._timer = None
        if self.end is not None:
            return
        for event in self.mux.handle_timer(self._loop.time()):
            if isinstance(event, ev.HeartbeatTimedOut):
                logger.warning(
                    "! session %s: nothing heard for %.1f s, the link is dead",
                    self.name,
                    event.silent_s,
                )
                self._terminate(
                    SessionEnd(ErrorCode.HEARTBEAT_TIMEOUT, "heartbeat timeout", by_peer=True)
                )
                return
        if self.mux.has_data_to_send:
            self.flush_soon()
        self._timer = self._loop.call_at(self.mux.next_deadline(), self._on_timer)

    # -- events -----------------------------------------------------------------------------

    def _dispatch(self, event: ev.Event) -> None:
        if isinstance(event, ev.DataReceived):  # narrows the type for the compiled build
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._data_received(event.data)
            else:  # closed on our side while bytes were in flight: return the credit
                self.mux.acknowledge(event.stream_id, len(event.data))
        elif isinstance(event, ev.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._eof_received()
        elif isinstance(event, ev.WindowUpdated):
            if self._debug:
                logger.debug("< WINDOW_UPDATE sid=%d +%d", event.stream_id, event.increment)
        elif isinstance(event, ev.StreamOpened):
            self._stream_opened(event)
        elif isinstance(event, ev.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._finish(StreamReset(event.stream_id, event.code, remote=True))
        elif isinstance(event, ev.PingAcknowledged):
            self.round_trip_s = self._loop.time() - event.sent_at
        elif isinstance(event, ev.GoAwayReceived):
            logger.info(
                "< GO_AWAY session %s: %s %s", self.name, event.code.name, event.reason or ""
            )
            if self.on_go_away is not None:
                self.on_go_away(event)

    def _stream_opened(self, event: ev.StreamOpened) -> None:
        stream = Stream(self, event.stream_id, event.route, StreamHandler())
        self.streams[event.stream_id] = stream
        if self._accept_stream is None:
            stream.reset(ErrorCode.REFUSED_STREAM)
            return
        try:
            stream.set_handler(self._accept_stream(stream))
        except Exception:
            logger.exception("accepting stream %d failed", event.stream_id)
            stream.reset(ErrorCode.INTERNAL_ERROR)

    def statistics(self) -> SessionStatistics:
        return SessionStatistics(
            streams=len(self.streams),
            paused_writers=len(self.paused_writers),
            bytes_written=self.bytes_written,
            bytes_read=self.bytes_read,
            messages_sent=self.messages_sent,
            messages_received=self.messages_received,
            round_trip_s=self.round_trip_s,
        )
