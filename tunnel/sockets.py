"""What both sides do to a TCP connection beyond the transport's own calls.

A raw TCP tunnel (server/tcp.py, protocol.md §4.7) passes a reset through
as a reset, in both directions, the rule HTTP/2 gives a proxy for the TCP
connections it carries (RFC 9113 §8.5): an error on the TCP connection
resets the stream, and a stream reset resets the TCP connection, so an
application at either end sees "connection reset" and never a clean end
that did not happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Final

#: SO_LINGER on, for 0 s: closing sends a reset and drops what is unsent
_LINGER_NONE: Final = struct.pack("ii", 1, 0)


def reset_connection(transport: asyncio.Transport) -> None:
    """Close with a reset (RST) instead of a FIN, dropping what is still unsent."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_NONE)
    transport.abort()
