"""Path allowlists: which paths of a route the public may reach (docs/security.md).

A faasd gateway should be public for ``/function/`` and nothing else. The
request target is forwarded byte for byte, but the allowlist is matched
against a *normalised* path, so that ``%2F``, ``..``, ``//`` and backslashes
cannot make ``/system/`` look like ``/function/``: percent-escapes are
decoded once, backslashes read as slashes, runs of slashes merged and dot
segments removed (RFC 3986 §5.2.4). Whatever cannot be normalised safely,
or still looks encoded after one decoding, is refused: we fail closed.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Final

MAX_ALLOWED_PATHS: Final = 32
_STILL_ENCODED = re.compile(rb"%(2e|2f|5c|25)", re.IGNORECASE)
_BAD_ESCAPE = re.compile(rb"%(?![0-9a-fA-F]{2})")


class UnsafePath(ValueError):
    """The path cannot be normalised safely (it climbs above the root, or is double-encoded)."""


def normalize_path(target: bytes) -> str:
    """The path of a request target as the allowlist sees it.

    Raises:
        UnsafePath: a malformed escape, a double encoding, or ``..`` above the root.
    """
    path = target.partition(b"?")[0].partition(b"#")[0]
    if _BAD_ESCAPE.search(path):
        raise UnsafePath("malformed percent-escape")
    decoded = urllib.parse.unquote_to_bytes(path)
    if _STILL_ENCODED.search(decoded):
        raise UnsafePath("double-encoded path")
    text = decoded.decode("latin-1").replace("\\", "/")
    segments: list[str] = []
    for segment in text.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise UnsafePath("path climbs above the root")
            segments.pop()
            continue
        segments.append(segment)
    normalized = "/" + "/".join(segments)
    if text.endswith(("/", "/.", "/..")) and segments:
        normalized += "/"
    return normalized


def path_allowed(target: bytes, prefixes: tuple[str, ...]) -> bool:
    """Whether a request target falls under one of ``prefixes`` (an empty list allows all).

    A prefix ending in ``/`` matches what is below it; one without also
    matches itself exactly: ``/function`` allows ``/function`` and
    ``/function/x`` but not ``/functions``.
    """
    if not prefixes:
        return True
    if target == b"*":
        return False
    try:
        path = normalize_path(target)
    except UnsafePath:
        return False
    for prefix in prefixes:
        if prefix.endswith("/"):
            if path.startswith(prefix) or path == prefix.rstrip("/"):
                return True
        elif path == prefix or path.startswith(prefix + "/"):
            return True
    return False


def valid_prefix(prefix: object) -> bool:
    """Whether a client may declare ``prefix`` in an allowlist: a plain, normal path."""
    if not (
        isinstance(prefix, str)
        and prefix.startswith("/")
        and len(prefix) <= 256
        and prefix.isascii()
        and prefix.isprintable()
        and "%" not in prefix
        and "\\" not in prefix
    ):
        return False
    try:
        return normalize_path(prefix.encode()).rstrip("/") == prefix.rstrip("/")
    except UnsafePath:
        return False
