"""HTTP/1.1 header rules for the exit server's reverse proxy (RFC 9110, RFC 9112).

Headers are kept as ``(name, value)`` byte pairs in the order they arrived,
names in their original case: repeated headers stay separate and values are
passed exactly. Only the proxy's own concerns are touched: hop-by-hop
headers (RFC 9110 §7.6.1) are dropped, ``X-Forwarded-*`` from visitors are
replaced by ours, and message framing (``Content-Length``,
``Transfer-Encoding``) is set by us for the hop we write.

A :class:`HeaderBlock` classifies each header once, as the parser reports
it: the few names the proxy cares about are noted on the way, so building
the head for the next hop is one pass with no further scanning (scanning
the list once per rule cost a fifth of the exit server's time per request,
docs/performance.md).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Final

Header = tuple[bytes, bytes]

#: Limits on what a visitor may send (docs/security.md). The header limits
#: are checked on parsed sizes, so they hold however the bytes are split.
MAX_TARGET_BYTES: Final = 8190
MAX_FIELD_BYTES: Final = 8190
MAX_HEADERS: Final = 100
MAX_HEAD_BYTES: Final = 32 * 1024
#: Limits on what an upstream may answer; beyond them the visitor gets a 502.
MAX_RESPONSE_HEADERS: Final = 256
MAX_RESPONSE_HEAD_BYTES: Final = 64 * 1024

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
#: Set by the proxy, never trusted from a visitor.
FORWARDING: Final = frozenset(
    {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-server",
        b"x-real-ip",
        b"forwarded",
    }
)
#: A ``Connection`` header may not make us drop these: losing Host or the
#: framing of a body we forward would desynchronise the upstream.
_NEVER_DROPPED: Final = frozenset({b"host", b"content-length"})

# What a header is to the proxy; everything else passes untouched.
HOST: Final = 1
CONTENT_LENGTH: Final = 2
TRANSFER_ENCODING: Final = 3
CONNECTION: Final = 4
UPGRADE: Final = 5
EXPECT: Final = 6
HOP: Final = 7  #: hop-by-hop: never passed on, either way
FORWARDED: Final = 8  #: X-Forwarded-* and kin: replaced in requests, passed in responses
#: ``KINDS.get(lower_name, 0)``: a header's kind, 0 for ordinary ones.
KINDS: Final[dict[bytes, int]] = {
    **dict.fromkeys(FORWARDING, FORWARDED),
    **dict.fromkeys(HOP_BY_HOP, HOP),
    b"host": HOST,
    b"content-length": CONTENT_LENGTH,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"connection": CONNECTION,
    b"upgrade": UPGRADE,
    b"expect": EXPECT,
}


#: Kinds by header name exactly as sent, for the first names seen: peers
#: send the same few names in the same case, and ``bytes.lower()`` is a
#: generic call in the compiled build. Bounded in entries and name length,
#: so names a visitor invents only ever take the long way.
#: The hot callbacks look here first and call :func:`kind_of` on a miss.
KIND_AS_SENT: Final[dict[bytes, int]] = {}
_KIND_AS_SENT_ENTRIES: Final = 256
_KIND_AS_SENT_NAME_BYTES: Final = 40


def kind_of(name: bytes) -> int:
    """A header's kind (HOST, HOP, …) from its name in any case; 0 for ordinary ones."""
    kind = KIND_AS_SENT.get(name)
    if kind is None:
        kind = KINDS.get(name.lower(), 0)
        if len(KIND_AS_SENT) < _KIND_AS_SENT_ENTRIES and len(name) <= _KIND_AS_SENT_NAME_BYTES:
            KIND_AS_SENT[name] = kind
    return kind


class HeaderBlock:
    """The headers of one message, in order, with what the proxy needs noted once.

    The parser's ``on_header`` callback adds to it inline (``kind_of`` and the
    three lists), since a method call per header is a measurable share of an
    exchange; ``special`` holds the values of the few names the proxy reads.
    """

    __slots__ = ("has_dropped", "items", "kinds", "size", "special")

    def __init__(self) -> None:
        self.items: list[Header] = []
        #: the kind of each item (0 for ordinary headers), in the same order
        self.kinds: list[int] = []
        #: kind -> values, for the kinds present
        self.special: dict[int, list[bytes]] = {}
        #: whether any header must be left out of the next hop
        self.has_dropped = False
        self.size = 0

    def add(self, name: bytes, value: bytes) -> None:
        """Note one header (what ``on_header`` callbacks do inline)."""
        self.items.append((name, value))
        self.size += len(name) + len(value) + 4
        kind = kind_of(name)
        self.kinds.append(kind)
        if kind:
            self.noted(kind, value)

    def noted(self, kind: int, value: bytes) -> None:
        """Record the value of a header of a special ``kind``."""
        values = self.special.get(kind)
        if values is None:
            self.special[kind] = [value]
        else:
            values.append(value)
        if kind >= TRANSFER_ENCODING and kind != EXPECT:
            self.has_dropped = True

    def values(self, kind: int) -> list[bytes]:
        """The values of the headers of ``kind`` (HOST, CONTENT_LENGTH, …), in order."""
        return self.special.get(kind) or []

    def connection_tokens(self) -> set[bytes]:
        """The lower-cased option names listed in ``Connection`` (never Host or Content-Length)."""
        tokens: set[bytes] = set()
        for value in self.values(CONNECTION):
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
        return tokens - _NEVER_DROPPED

    def is_websocket_upgrade(self) -> bool:
        """Whether the message asks to upgrade to WebSocket (and only that)."""
        upgrade = self.values(UPGRADE)
        return (
            len(upgrade) == 1
            and upgrade[0].strip().lower() == b"websocket"
            and b"upgrade" in self.connection_tokens()
        )

    def listed_by_connection(self) -> frozenset[bytes]:
        """Other header names ``Connection`` asks the proxy to drop (usually none)."""
        values = self.special.get(CONNECTION)
        if not values or (len(values) == 1 and values[0].lower() in _PLAIN_CONNECTION):
            return _NOTHING
        return frozenset(self.connection_tokens() - HOP_BY_HOP - {b"close"})


#: What ``Connection`` usually says, which names no other header.
_PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close", b"upgrade"})
_NOTHING: Final[frozenset[bytes]] = frozenset()


def upstream_request_head(
    method: bytes,
    target: bytes,
    block: HeaderBlock,
    *,
    visitor_ip: str,
    proto: str,
    host_rewrite: bytes | None,
    chunked: bool,
    upgrade: bool,
    default_host: bytes = b"",
) -> bytes:
    """The HTTP/1.1 request head the exit server sends to the upstream.

    Visitor headers pass in order and unchanged except: hop-by-hop headers
    and any named in ``Connection`` are dropped (``Upgrade`` is kept for a
    WebSocket upgrade), ``X-Forwarded-*`` are replaced, ``Host`` is
    rewritten when the route asks (or set to ``default_host`` for an HTTP/1.0
    request that had none: HTTP/1.1 requires it), and framing is chunked or
    left as the visitor's ``Content-Length``.
    """
    lines = [method, b" ", target, b" HTTP/1.1\r\n"]
    listed = block.listed_by_connection()
    hosts = block.special.get(HOST)  # block.values(), inline
    original_host = hosts[0] if hosts else b""
    items, kinds = block.items, block.kinds
    for i in range(len(items)):  # not zip(): compiled, a zip is iterated generically
        name, value = items[i]
        kind = kinds[i]
        if kind:
            if kind == HOST:
                if host_rewrite is not None:
                    value = host_rewrite
            elif kind == UPGRADE:
                if not upgrade:
                    continue
            elif kind != CONTENT_LENGTH and kind != EXPECT:
                continue  # hop-by-hop, X-Forwarded-*, framing: ours to set
        elif listed and name.lower() in listed:
            continue
        _add_field(lines, name, value)
    if not original_host:
        lines += (b"Host: ", host_rewrite or default_host, b"\r\n")
    if upgrade:
        lines.append(b"Connection: Upgrade\r\n")
    if chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    lines += (
        b"X-Forwarded-For: ", visitor_ip.encode(), b"\r\n",
        b"X-Forwarded-Proto: ", proto.encode(), b"\r\n",
    )  # fmt: skip
    if original_host:
        lines += (b"X-Forwarded-Host: ", original_host, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def _add_field(lines: list[bytes], name: bytes, value: bytes) -> None:
    """A header line's four parts, appended one by one: no tuple built per header."""
    lines.append(name)
    lines.append(b": ")
    lines.append(value)
    lines.append(b"\r\n")


class Framing:
    """How the response body is delimited on the visitor's hop."""

    LENGTH: Final = "length"  #: the upstream's Content-Length, kept where it was
    CHUNKED: Final = "chunked"  #: Transfer-Encoding: chunked (re-chunked by us)
    CLOSE: Final = "close"  #: the body ends when the connection closes (HTTP/1.0 visitors)
    NONE: Final = "none"  #: no body (204, 1xx); Content-Length dropped
    HEAD: Final = "head"  #: no body, but Content-Length kept as metadata (HEAD, 304)


def visitor_response_head(
    status: int,
    reason: bytes,
    block: HeaderBlock,
    *,
    framing: str,
    keep_alive: bool,
    http10_visitor: bool,
    upgrade: bool = False,
) -> bytes:
    """The response head the exit server sends to the visitor.

    End-to-end headers pass in order, case and value unchanged, framing
    headers included where the upstream put them; only hop-by-hop headers
    are dropped and our own ``Connection`` added.
    """
    keep_length = framing in (Framing.LENGTH, Framing.HEAD)
    lines = [b"HTTP/1.1 ", str(status).encode(), b" ", reason or _reason(status), b"\r\n"]
    listed = block.listed_by_connection()
    chunked_written = False
    items, kinds = block.items, block.kinds
    for i in range(len(items)):  # as in upstream_request_head
        name, value = items[i]
        kind = kinds[i]
        if kind:
            if kind == CONTENT_LENGTH:
                if not keep_length:
                    continue
            elif kind == TRANSFER_ENCODING:
                if framing == Framing.CHUNKED and not chunked_written:
                    lines += (name, b": chunked\r\n")
                    chunked_written = True
                continue
            elif kind == UPGRADE:
                if not upgrade:
                    continue
            elif kind in (HOP, CONNECTION):
                continue
        elif listed and name.lower() in listed:
            continue
        _add_field(lines, name, value)
    if framing == Framing.CHUNKED and not chunked_written:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    if upgrade:
        lines.append(b"Connection: Upgrade\r\n")
    elif not keep_alive:
        lines.append(b"Connection: close\r\n")
    elif http10_visitor:
        lines.append(b"Connection: keep-alive\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def informational_head(status: int, reason: bytes, block: HeaderBlock) -> bytes:
    """A 1xx response relayed to the visitor (100 Continue, 103 Early Hints)."""
    lines = [b"HTTP/1.1 ", str(status).encode(), b" ", reason or _reason(status), b"\r\n"]
    listed = block.listed_by_connection()
    for (name, value), kind in zip(block.items, block.kinds, strict=True):
        if kind in (HOP, TRANSFER_ENCODING, CONTENT_LENGTH, CONNECTION, UPGRADE):
            continue
        if listed and name.lower() in listed:
            continue
        _add_field(lines, name, value)
    lines.append(b"\r\n")
    return b"".join(lines)


#: Short fixed bodies for the answers the proxy makes itself. They never
#: carry exception text, addresses or anything the visitor sent.
_ERROR_TEXT: Final = {
    400: "bad request",
    403: "forbidden",
    404: "not found",
    405: "method not allowed",
    408: "request timeout",
    411: "length required",
    413: "request body too large",
    414: "request target too long",
    417: "expectation failed",
    421: "misdirected request",
    431: "request header fields too large",
    500: "internal error in the exit server",
    501: "not implemented",
    502: "bad gateway: the upstream did not answer properly",
    503: "service unavailable: no tunnel client serves this host right now",
    504: "gateway timeout: the upstream did not answer in time",
    505: "HTTP version not supported",
}
#: for a request still unanswered when the exit server's drain time is up,
#: and for a connection made while it drains
SHUTTING_DOWN_TEXT: Final = "service unavailable: the exit server is restarting"
#: for a connection beyond --max-connections
AT_CAPACITY_TEXT: Final = "service unavailable: the exit server has too many open connections"
#: for a connection beyond --max-connections-per-address
TOO_MANY_FROM_ADDRESS_TEXT: Final = "too many open connections from your address"


def error_response(
    status: int, *, keep_alive: bool = False, head_only: bool = False, text: str | None = None
) -> bytes:
    """A complete short plain-text response for an error the proxy answers itself.

    ``text``, one of ours (never the visitor's or an upstream's), says more
    than the status's usual one.
    """
    text = text or _ERROR_TEXT.get(status) or _reason(status).decode()
    return plain_response(
        status, f"{status} {text}\n".encode(), keep_alive=keep_alive, head_only=head_only
    )


def plain_response(
    status: int,
    body: bytes,
    *,
    keep_alive: bool = False,
    head_only: bool = False,
    location: bytes | None = None,
) -> bytes:
    """A complete plain-text response the proxy answers itself, with ``body``.

    ``location``: a redirect's target, which the caller has made safe for a header.
    """
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (status, _reason(status)),
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(body),
        b"Cache-Control: no-store\r\n",
    ]
    if location is not None:
        lines += (b"Location: ", location, b"\r\n")
    if status in (503, 429):
        lines.append(b"Retry-After: 5\r\n")
    if status == 405:
        lines.append(b"Allow: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS\r\n")
    lines.append(b"\r\n" if keep_alive else b"Connection: close\r\n\r\n")
    if not head_only:
        lines.append(body)
    return b"".join(lines)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"
