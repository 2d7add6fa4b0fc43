"""Waiting until a new exit server answers on its control port, with its pinned certificate.

``GET /healthz`` on the control port answers ``ok`` without a token. The
certificate is checked against the fingerprint made for this node right
after the TLS handshake and before the request is sent, with the same
helpers the client pins with (:mod:`tunnel.tls`): another certificate means
something else answers there, and we stop at once rather than trust it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import ssl
import time
from typing import Final

from homeport.exitnode.errors import ExitNodeError
from tunnel.tls import PinMismatch, check_pin, client_context, parse_fingerprint

ATTEMPT_TIMEOUT_S: Final = 5.0
MAX_HEAD_BYTES: Final = 16 * 1024
_CONTENT_LENGTH: Final = re.compile(rb"\r\ncontent-length:[ \t]*(\d{1,6})[ \t]*\r\n", re.IGNORECASE)


def host_for_url(ip: str) -> str:
    """An address as it goes in a URL: IPv6 in brackets."""
    return f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip


class PinMismatchError(ExitNodeError):
    """Something answers on the control port with another certificate than ours."""


async def _health_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The status line and the body of the answer (Content-Length, else up to 1 KiB)."""
    head = await reader.readuntil(b"\r\n\r\n")  # at most MAX_HEAD_BYTES (the reader's limit)
    match = _CONTENT_LENGTH.search(head)
    body = await (reader.readexactly(int(match.group(1))) if match else reader.read(1024))
    return head.split(b"\r\n", 1)[0], body


async def check_once(ip: str, port: int, pin: bytes) -> bool:
    """One health check: True when the server answered ``ok`` with our certificate.

    Raises:
        PinMismatchError: the certificate is not ours.
    """
    url = f"https://{host_for_url(ip)}:{port}/healthz"
    try:
        async with asyncio.timeout(ATTEMPT_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(
                ip, port, ssl=client_context(pinned=True), limit=MAX_HEAD_BYTES
            )
            try:
                ssl_object = writer.get_extra_info("ssl_object")
                check_pin(ssl_object.getpeercert(binary_form=True), pin)
                writer.write(
                    f"GET /healthz HTTP/1.1\r\nHost: {host_for_url(ip)}:{port}\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                status, body = await _health_answer(reader)
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
    except PinMismatch as exc:
        raise PinMismatchError(f"something else answers on {url}: {exc}") from None
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return False  # not up yet (or not answering sensibly): try again later
    return status.startswith(b"HTTP/1.1 200") and body.strip() == b"ok"


async def wait_until_serving(
    ip: str, control_port: int, fingerprint: str, deadline: float, interval_s: float
) -> None:
    """Return once the exit server at ``ip`` answers its health check with our certificate.

    ``deadline`` is a :func:`time.monotonic` value.

    Raises:
        PinMismatchError: another certificate answered.
        ExitNodeError: no answer by the deadline.
    """
    pin = parse_fingerprint(fingerprint)
    while not await check_once(ip, control_port, pin):
        if time.monotonic() + interval_s > deadline:
            url = f"https://{host_for_url(ip)}:{control_port}/healthz"
            raise ExitNodeError(
                f"the exit server did not answer on {url} in time; the VM may still be "
                "installing homeport (on it: journalctl -u homeport-exit, "
                "/var/log/cloud-init-output.log), or the control port is blocked"
            )
        await asyncio.sleep(interval_s)
