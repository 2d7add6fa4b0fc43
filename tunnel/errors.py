"""Errors of the tunnel, and the wire codes they carry.

Every failure homeport decides about is one of these types. Foreign
exceptions (``OSError``, websockets, aiohttp) are mapped to them once, at the
I/O edge. Messages never carry a token, a header value or payload bytes.

The hierarchy (docs/protocol.md §8)::

    TunnelError
    ├── ProtocolError(code)          the peer broke the protocol: the session ends
    ├── StreamError(stream_id, code) one stream ends, the session goes on
    │   ├── StreamReset                  reset by the peer or by us
    │   └── StreamClosed                 used after it was closed
    ├── SessionClosed(code, reason)  the session is gone (peer closed, link died)
    ├── AuthRejected                 the server refused our token
    ├── VersionMismatch              the two sides speak different protocol versions
    ├── NoRoute                      no connected client serves this host (HTTP 503)
    ├── UpstreamError(status)        the LAN service failed (HTTP 502 or 504)
    └── ConfigError                  bad configuration: the CLI prints it and exits 2
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Wire error codes, carried by ``RST`` and ``GO_AWAY`` frames (protocol.md §8)."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    STREAM_CLOSED = 0x4
    FRAME_SIZE_ERROR = 0x5
    REFUSED_STREAM = 0x6
    CANCEL = 0x7
    NO_SUCH_ROUTE = 0x8
    CONNECT_REFUSED = 0x9
    CONNECT_TIMEOUT = 0xA
    UPSTREAM_RESET = 0xB
    ENHANCE_YOUR_CALM = 0xC
    HEARTBEAT_TIMEOUT = 0xD
    REPLACED = 0xE
    GOING_AWAY = 0xF

    @classmethod
    def from_wire(cls, value: int) -> ErrorCode:
        """Map a received code to a member; codes we do not know count as INTERNAL_ERROR."""
        try:
            return cls(value)
        except ValueError:
            return cls.INTERNAL_ERROR


#: HTTP status the exit server answers with when a stream to an upstream ends
#: with this code before the response began (protocol.md §8).
HTTP_STATUS_FOR_CODE: dict[ErrorCode, int] = {
    ErrorCode.NO_ERROR: 502,
    ErrorCode.PROTOCOL_ERROR: 502,
    ErrorCode.INTERNAL_ERROR: 502,
    ErrorCode.FLOW_CONTROL_ERROR: 502,
    ErrorCode.STREAM_CLOSED: 502,
    ErrorCode.FRAME_SIZE_ERROR: 502,
    ErrorCode.REFUSED_STREAM: 503,
    ErrorCode.CANCEL: 502,
    ErrorCode.NO_SUCH_ROUTE: 502,
    ErrorCode.CONNECT_REFUSED: 502,
    ErrorCode.CONNECT_TIMEOUT: 504,
    ErrorCode.UPSTREAM_RESET: 502,
    ErrorCode.ENHANCE_YOUR_CALM: 503,
    ErrorCode.HEARTBEAT_TIMEOUT: 502,
    ErrorCode.REPLACED: 502,
    ErrorCode.GOING_AWAY: 503,
}


class TunnelError(Exception):
    """Base of every error homeport raises on purpose."""


class ProtocolError(TunnelError):
    """The peer violated the protocol; the whole session must end.

    Frames are not resynchronisable, so there is no recovering from one.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class StreamError(TunnelError):
    """One stream failed; the session and its other streams go on."""

    def __init__(self, stream_id: int, code: ErrorCode, message: str = "") -> None:
        text = f"stream {stream_id}: {code.name}"
        super().__init__(f"{text}: {message}" if message else text)
        self.stream_id = stream_id
        self.code = code


class StreamReset(StreamError):
    """The stream was reset, by the peer (``remote``) or by us."""

    def __init__(self, stream_id: int, code: ErrorCode, *, remote: bool) -> None:
        who = "peer" if remote else "local"
        super().__init__(stream_id, code, f"reset by {who}")
        self.remote = remote


class StreamClosed(StreamError):
    """An operation was attempted on a stream that can no longer do it."""


class SessionClosed(TunnelError):
    """The session ended: closed by either side, or the link died."""

    def __init__(self, code: ErrorCode = ErrorCode.NO_ERROR, reason: str = "") -> None:
        super().__init__(f"session closed: {code.name}" + (f" ({reason})" if reason else ""))
        self.code = code
        self.reason = reason


class AuthRejected(TunnelError):
    """The exit server refused the client's token (HTTP 401 before the upgrade)."""


class VersionMismatch(TunnelError):
    """The two sides speak different protocol versions."""


class NoRoute(TunnelError):
    """No connected client serves the requested host."""


class UpstreamError(TunnelError):
    """The upstream behind a client failed; ``status`` is what the visitor gets."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ConfigError(TunnelError):
    """The configuration cannot work; the message says what to change."""
