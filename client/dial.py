"""Dialling the exit server: one websocket, authenticated in its handshake.

Every way the dial can fail is mapped here, once, to an error whose message
a user can act on; none of them carries the token.
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.parse
from typing import Final

from websockets.exceptions import InvalidHandshake

from tunnel.errors import AuthRejected, TunnelError, VersionMismatch
from tunnel.tls import PinMismatch
from tunnel.version import SOFTWARE
from tunnel.websocket import HANDSHAKE_TIMEOUT_S, ClientConnection, refused_status


class DialFailed(TunnelError):
    """The exit server could not be reached or refused us; worth retrying."""


class RateLimited(DialFailed):
    """The exit server asked us to slow down (HTTP 429)."""


OPEN_TIMEOUT_S: Final = HANDSHAKE_TIMEOUT_S


async def dial(
    url: str,
    token: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    pin: bytes | None = None,
    timeout_s: float = OPEN_TIMEOUT_S,
) -> ClientConnection:
    """Open the control websocket to ``url`` with the token in an Authorization header.

    With ``pin``, the server's certificate must have that SHA-256; it is
    checked before anything is sent. TCP, TLS and the websocket handshake
    together must take less than ``timeout_s``.

    Raises:
        PinMismatch: the certificate is not the pinned one.
        AuthRejected: the server answered 401.
        VersionMismatch: the server speaks another protocol version (426).
        RateLimited: the server answered 429.
        DialFailed: anything else: refused, unreachable, timed out, TLS failure.
    """
    parsed = urllib.parse.urlsplit(url)
    secure = parsed.scheme == "wss"
    host = parsed.hostname or ""
    port = parsed.port or (443 if secure else 80)
    loop = asyncio.get_running_loop()
    handshake: asyncio.Future[None] = loop.create_future()
    headers = {"Authorization": f"Bearer {token}", "User-Agent": SOFTWARE}
    connection = ClientConnection(url, headers, pin, handshake)
    try:
        try:
            await _open(
                loop, connection, host, port, ssl_context if secure else None, handshake, timeout_s
            )
        except BaseException:
            connection.abort()
            handshake.cancel()
            raise
    except PinMismatch:
        raise
    except ssl.SSLCertVerificationError as exc:
        hint = ""
        if "not yet valid" in str(exc.verify_message):
            hint = "; is this machine's clock wrong (a Pi with no clock after a power cut)?"
        elif "self-signed" in str(exc.verify_message):
            hint = "; pin it with --fingerprint (the exit server prints it at start)"
        raise DialFailed(f"TLS certificate rejected: {exc.verify_message}{hint}") from None
    except ssl.SSLError as exc:
        raise DialFailed(f"TLS failed with {url}: {exc.reason or exc}") from None
    except TimeoutError:
        raise DialFailed(f"no answer from {url} within {timeout_s:g} s") from None
    except InvalidHandshake as exc:
        refused = refused_status(exc)
        if refused is None:
            raise DialFailed(f"bad handshake from {url}: {exc}") from None
        raise _refusal(*refused) from None
    except OSError as exc:
        raise DialFailed(f"cannot reach {url}: {exc.strerror or exc}") from None
    return connection


async def _open(
    loop: asyncio.AbstractEventLoop,
    connection: ClientConnection,
    host: str,
    port: int,
    tls: ssl.SSLContext | None,
    handshake: asyncio.Future[None],
    timeout_s: float,
) -> None:
    async with asyncio.timeout(timeout_s):
        await loop.create_connection(
            lambda: connection,
            host,
            port,
            ssl=tls,
            server_hostname=host if tls else None,
            ssl_handshake_timeout=timeout_s if tls else None,
        )
        await handshake


def _refusal(status: int, body: bytes) -> TunnelError:
    text = _body_text(body)
    if status == 401:
        return AuthRejected("token rejected by server (HTTP 401)")
    if status == 426:
        return VersionMismatch(text or "protocol version mismatch (HTTP 426)")
    if status == 429:
        return RateLimited("too many failed attempts from this address (HTTP 429); waiting")
    return DialFailed(f"server refused the connection: HTTP {status} {text}".rstrip())


def _body_text(body: bytes) -> str:
    """A server's short error text, made safe to print."""
    text = body[:300].decode("utf-8", "replace").strip()
    return "".join(c if c.isprintable() else "?" for c in text)
