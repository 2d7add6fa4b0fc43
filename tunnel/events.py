"""Events the multiplexer returns: past-tense facts about what the peer did.

Plain slotted dataclasses, not frozen ones: one is made per frame received,
and freezing costs three times the construction (docs/performance.md). The
ones made for every request write their ``__init__`` out (``init=False``):
the compiled build leaves a generated one interpreted, six times slower.

:meth:`tunnel.mux.Multiplexer.receive_data` and
:meth:`~tunnel.mux.Multiplexer.handle_timer` return lists of these; the
asyncio session turns them into calls on stream handlers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunnel.errors import ErrorCode


@dataclass(slots=True)
class HelloReceived:
    """The peer's HELLO arrived and its version matched ours."""

    fields: dict[str, Any]


@dataclass(slots=True)
class StreamOpened:
    """The peer opened a stream to the upstream of ``route``."""

    stream_id: int
    route: str


@dataclass(slots=True, init=False)
class DataReceived:
    """Bytes arrived on a stream. Return credit with ``acknowledge`` once consumed."""

    stream_id: int
    data: bytes | memoryview

    def __init__(self, stream_id: int, data: bytes | memoryview) -> None:
        self.stream_id = stream_id
        self.data = data


@dataclass(slots=True, init=False)
class StreamEnded:
    """The peer half-closed the stream: it will send no more bytes on it."""

    stream_id: int

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


@dataclass(slots=True)
class StreamReset:
    """The peer reset the stream (or refused it, after a GO_AWAY)."""

    stream_id: int
    code: ErrorCode


@dataclass(slots=True, init=False)
class WindowUpdated:
    """The peer granted more credit; buffered bytes for the stream may now flow."""

    stream_id: int
    increment: int

    def __init__(self, stream_id: int, increment: int) -> None:
        self.stream_id = stream_id
        self.increment = increment


@dataclass(slots=True)
class PingAcknowledged:
    """The peer answered our latest heartbeat, sent at ``sent_at`` in the caller's clock."""

    sent_at: float


@dataclass(slots=True)
class GoAwayReceived:
    """The peer will open no new streams and wants none from us."""

    last_stream_id: int
    code: ErrorCode
    reason: str


@dataclass(slots=True)
class HeartbeatTimedOut:
    """Nothing came back from the peer within the heartbeat timeout: the link is dead."""

    silent_s: float


Event = (
    HelloReceived
    | StreamOpened
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowUpdated
    | PingAcknowledged
    | GoAwayReceived
    | HeartbeatTimedOut
)
