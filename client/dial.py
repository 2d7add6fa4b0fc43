"""Dialling the exit server: one websocket, authenticated in its handshake.

Every way the dial can fail is mapped here, once, to an error whose message
a user can act on; none of them carries the token.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, Final, cast

import websockets
from websockets.asyncio.client import ClientConnection, connect

from tunnel.errors import AuthRejected, TunnelError, VersionMismatch
from tunnel.session import MAX_RECEIVE_MESSAGE_BYTES
from tunnel.tls import PinMismatch, check_pin
from tunnel.version import SOFTWARE

SUBPROTOCOL: Final = "homeport.v1"
OPEN_TIMEOUT_S: Final = 10.0


class DialFailed(TunnelError):
    """The exit server could not be reached or refused us; worth retrying."""


class RateLimited(DialFailed):
    """The exit server asked us to slow down (HTTP 429)."""


def _pinned_connection(expected: bytes, failures: list[PinMismatch]) -> type[ClientConnection]:
    """A websocket connection that checks the certificate pin as soon as TLS is up.

    asyncio calls ``connection_made`` once the TLS handshake is done and
    before websockets writes its HTTP request, so a wrong certificate never
    sees the token.
    """

    class PinnedConnection(ClientConnection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            super().connection_made(transport)
            try:
                check_pin(der, expected)
            except PinMismatch as exc:
                failures.append(exc)
                cast(asyncio.Transport, transport).abort()  # not a byte more on this one

    return PinnedConnection


async def dial(
    url: str,
    token: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    pin: bytes | None = None,
) -> ClientConnection:
    """Open the control websocket to ``url`` with the token in an Authorization header.

    With ``pin``, the server's certificate must have that SHA-256; it is
    checked before anything is sent.

    Raises:
        PinMismatch: the certificate is not the pinned one.
        AuthRejected: the server answered 401.
        VersionMismatch: the server speaks another protocol version (426).
        RateLimited: the server answered 429.
        DialFailed: anything else: refused, unreachable, timed out, TLS failure.
    """
    pin_failures: list[PinMismatch] = []
    options: dict[str, Any] = {}
    if pin is not None:
        options["create_connection"] = _pinned_connection(pin, pin_failures)
    try:
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
                **options,
            )
        except Exception:
            if pin_failures:  # the connection was dropped because of the pin: say so
                raise pin_failures[0] from None
            raise
    except websockets.InvalidStatus as exc:
        raise _refusal(exc.response.status_code, _body_text(exc.response.body)) from None
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
        raise DialFailed(f"no answer from {url} within {OPEN_TIMEOUT_S:.0f} s") from None
    except OSError as exc:
        raise DialFailed(f"cannot reach {url}: {exc.strerror or exc}") from None
    except (websockets.InvalidHandshake, EOFError) as exc:
        raise DialFailed(f"bad handshake from {url}: {exc}") from None


def _refusal(status: int, text: str) -> TunnelError:
    if status == 401:
        return AuthRejected("token rejected by server (HTTP 401)")
    if status == 426:
        return VersionMismatch(text or "protocol version mismatch (HTTP 426)")
    if status == 429:
        return RateLimited("too many failed attempts from this address (HTTP 429); waiting")
    return DialFailed(f"server refused the connection: HTTP {status} {text}".rstrip())


def _body_text(body: bytes | bytearray | None) -> str:
    """A server's short error text, made safe to print."""
    if not body:
        return ""
    text = body[:300].decode("utf-8", "replace").strip()
    return "".join(c if c.isprintable() else "?" for c in text)
