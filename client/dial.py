"""Dialling the exit server: one websocket, authenticated in its handshake.

Every way the dial can fail is mapped here, once, to an error whose message
a user can act on; none of them carries the token.
"""

from __future__ import annotations

import ssl
from typing import Final

import websockets
from websockets.asyncio.client import ClientConnection, connect

from tunnel.errors import AuthRejected, TunnelError, VersionMismatch
from tunnel.session import MAX_RECEIVE_MESSAGE_BYTES
from tunnel.version import SOFTWARE

SUBPROTOCOL: Final = "homeport.v1"
OPEN_TIMEOUT_S: Final = 10.0


class DialFailed(TunnelError):
    """The exit server could not be reached or refused us; worth retrying."""


class RateLimited(DialFailed):
    """The exit server asked us to slow down (HTTP 429)."""


async def dial(
    url: str, token: str, *, ssl_context: ssl.SSLContext | None = None
) -> ClientConnection:
    """Open the control websocket to ``url`` with the token in an Authorization header.

    Raises:
        AuthRejected: the server answered 401.
        VersionMismatch: the server speaks another protocol version (426).
        RateLimited: the server answered 429.
        DialFailed: anything else: refused, unreachable, timed out, TLS failure.
    """
    try:
        return await connect(
            url,
            additional_headers={"Authorization": f"Bearer {token}"},
            subprotocols=[websockets.Subprotocol(SUBPROTOCOL)],
            compression=None,
            user_agent_header=SOFTWARE,
            proxy=None,
            open_timeout=OPEN_TIMEOUT_S,
            ping_interval=None,  # the session's own heartbeat covers liveness
            close_timeout=2,
            max_size=MAX_RECEIVE_MESSAGE_BYTES,
            max_queue=64,
            write_limit=256 * 1024,
            ssl=ssl_context,
        )
    except websockets.InvalidStatus as exc:
        status = exc.response.status_code
        text = _body_text(exc.response.body)
        if status == 401:
            raise AuthRejected("token rejected by server (HTTP 401)") from None
        if status == 426:
            raise VersionMismatch(text or "protocol version mismatch (HTTP 426)") from None
        if status == 429:
            raise RateLimited("too many failed attempts from this address (HTTP 429)") from None
        raise DialFailed(f"server refused the connection: HTTP {status} {text}".rstrip()) from None
    except ssl.SSLCertVerificationError as exc:
        raise DialFailed(f"TLS certificate rejected: {exc.verify_message}") from None
    except TimeoutError:
        raise DialFailed(f"no answer from {url} within {OPEN_TIMEOUT_S:.0f} s") from None
    except OSError as exc:
        raise DialFailed(f"cannot reach {url}: {exc.strerror or exc}") from None
    except websockets.InvalidHandshake as exc:
        raise DialFailed(f"bad handshake from {url}: {exc}") from None


def _body_text(body: bytes | bytearray | None) -> str:
    """A server's short error text, made safe to print."""
    if not body:
        return ""
    text = body[:300].decode("utf-8", "replace").strip()
    return "".join(c if c.isprintable() else "?" for c in text)
