"""Tokens: making them, loading them, checking them (docs/security.md).

The client presents its token in the websocket handshake as
``Authorization: Bearer <token>``; never in a URL. The server keeps only the
token's SHA-256 and compares digests with :func:`hmac.compare_digest`, so
the check takes the same time whatever the presented value and its length.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Final

from tunnel.errors import ConfigError

logger = logging.getLogger("homeport.tunnel")

TOKEN_BYTES: Final = 32  # 256 bits of randomness
MIN_TOKEN_LENGTH: Final = 16
MAX_TOKEN_LENGTH: Final = 4096
#: What a token may be made of: printable ASCII without spaces, so it fits a header.
_TOKEN_CHARS: Final = re.compile(r"[\x21-\x7e]+")
_HASH_FORM: Final = re.compile(r"(?:sha256:)?([0-9a-f]{64})")


def generate_token() -> str:
    """A new random token: 256 bits, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_digest(token: str) -> bytes:
    """The SHA-256 of a token, which is all the server needs to keep."""
    return hashlib.sha256(token.encode()).digest()


def validate_token(token: str, *, source: str) -> str:
    """Check a token's form; return it.

    Raises:
        ConfigError: empty, too short, too long, or with spaces or control
            characters. The message names the source, never the value.
    """
    if not token:
        raise ConfigError(f"the token from {source} is empty")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"the token from {source} is shorter than {MIN_TOKEN_LENGTH} characters; "
            "make a strong one with `homeport token`"
        )
    if len(token) > MAX_TOKEN_LENGTH:
        raise ConfigError(f"the token from {source} is longer than {MAX_TOKEN_LENGTH} characters")
    if not _TOKEN_CHARS.fullmatch(token):
        raise ConfigError(
            f"the token from {source} has spaces or control characters; "
            "use printable ASCII (`homeport token` makes one)"
        )
    return token


def read_secret_file(path: Path, *, what: str) -> str:
    """Read a secret from a file, stripped of surrounding white space.

    Warns when the file is readable by other users.

    Raises:
        ConfigError: the file cannot be read.
    """
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "unreadable"
        raise ConfigError(f"cannot read the {what} file {path}: {reason}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "the %s file %s can be read by other users (mode %03o); run: chmod 600 %s",
            what,
            path,
            stat.S_IMODE(mode),
            path,
        )
    return text.strip()


def load_token(token: str | None, token_file: Path | None) -> str | None:
    """The token from ``--token`` or ``--token-file`` (the CLI settles which wins).

    Raises:
        ConfigError: the token file cannot be read or the token is malformed.
    """
    if token is not None:
        return validate_token(token, source="--token/HOMEPORT_TOKEN")
    if token_file is not None:
        return validate_token(read_secret_file(token_file, what="token"), source=str(token_file))
    return None


def parse_token_hash(text: str, *, source: str) -> bytes:
    """Parse a token hash given as 64 hex digits, optionally prefixed ``sha256:``.

    Raises:
        ConfigError: not a SHA-256 in hex.
    """
    match = _HASH_FORM.fullmatch(text.strip().lower())
    if match is None:
        raise ConfigError(f"the token hash from {source} is not 64 hex digits (sha256)")
    return bytes.fromhex(match.group(1))


def write_secret_file(path: Path, text: str) -> None:
    """Write a secret to a new file with mode 0600, replacing any old one atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class TokenVerifier:
    """Checks presented tokens against a stored SHA-256, in constant time."""

    def __init__(self, digest: bytes) -> None:
        if len(digest) != hashlib.sha256().digest_size:
            raise ValueError("a token digest is 32 bytes")
        self._digest = digest

    @classmethod
    def for_token(cls, token: str) -> TokenVerifier:
        return cls(token_digest(token))

    def __repr__(self) -> str:
        return "TokenVerifier(<redacted>)"

    def verify(self, presented: str | None) -> bool:
        """Whether ``presented`` is the token. ``None`` is never valid."""
        candidate = token_digest(presented if presented is not None else "")
        return hmac.compare_digest(candidate, self._digest) and presented is not None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, or None."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    credentials = credentials.strip()
    return credentials or None
