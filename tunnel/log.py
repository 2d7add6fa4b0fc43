"""Logging set-up shared by both sides: secrets redacted, visitor text escaped.

Loggers are ``homeport.tunnel``, ``homeport.server`` (with
``homeport.server.access`` for the access log) and ``homeport.client``.
Nothing we log should ever carry a token, but a last line of defence costs
little: every record passes :class:`RedactSecrets` before it is written.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Final

REDACTED: Final = "<redacted>"
_ESCAPES: Final = {i: f"\\x{i:02x}" for i in (*range(0x20), 0x7F)}
_ESCAPES.update({ord("\\"): "\\\\", ord('"'): '\\"'})
#: websockets logs every handshake header at DEBUG, Authorization included.
_WEBSOCKETS_HEADER_LINE: Final = ("> ", "< ")
#: the control port's paths (server/control.py), the only request lines logged
_PLAIN_REQUEST_LINES: Final = frozenset(
    f"GET {path} HTTP/1.1" for path in ("/connect", "/status", "/healthz")
)


def escape(text: str | bytes, limit: int = 512) -> str:
    """Make visitor-supplied text safe for one log line: control characters escaped."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable() and "\\" not in text and '"' not in text:
        return text  # the usual case, and translate() looks up every character
    return text.translate(_ESCAPES)


class RedactSecrets(logging.Filter):
    """Replace any known secret in a record's message and traceback text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets: list[str] = []
        self.add(*secrets)

    def add(self, *secrets: str) -> None:
        for secret in secrets:
            if secret and len(secret) >= 8:
                for form in _written_forms(secret):
                    if form not in self._secrets:
                        self._secrets.append(form)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        message = record.getMessage()
        redacted = self._redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._redact(record.exc_text)
        return True

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


def _written_forms(secret: str) -> set[str]:
    """``secret`` as it may be written: itself, URL-encoded, base64-encoded."""
    import base64  # websockets has loaded these already; deferred all the same
    from urllib.parse import quote, quote_plus

    raw = secret.encode()
    return {
        secret,
        quote(secret, safe=""),
        quote_plus(secret),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
    }


class _DropWebsocketsHeaders(logging.Filter):
    """websockets' DEBUG handshake dumps carry secrets: never let them through.

    A header line (``< Authorization: ...``) is dropped, and so is any
    request line but the plain ones of our own paths: a target may carry a
    token (``/connect?token=``, ``/connect;token=``, ``/connect%3Ftoken%3D``),
    the server refuses such a request, but a server that holds only the
    token's hash cannot redact a token it does not know.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            return True
        message = record.getMessage()
        if not message.startswith(_WEBSOCKETS_HEADER_LINE):
            return True
        if message.endswith(" HTTP/1.1"):
            return message[2:] in _PLAIN_REQUEST_LINES
        return ":" not in message and "?" not in message


_redactor = RedactSecrets()


def add_secrets(*secrets: str) -> None:
    """Register secrets that must never reach a log line."""
    _redactor.add(*secrets)


def redact(text: str) -> str:
    """``text`` with every registered secret replaced (for lines written without logging)."""
    return _redactor._redact(text)


def setup_logging(level: str = "info") -> None:
    """Configure the root logger for a homeport process (stderr, one line a record)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    handler.addFilter(_redactor)
    handler.addFilter(_DropWebsocketsHeaders())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    numeric = logging.getLevelName(level.upper())
    root.setLevel(numeric if isinstance(numeric, int) else logging.INFO)
    # websockets logs every connection at INFO (we log our own, better) and
    # every header at DEBUG (filtered above): only its warnings by default.
    logging.getLogger("websockets").setLevel(
        logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING
    )
    logging.getLogger("asyncio").setLevel(logging.WARNING)
