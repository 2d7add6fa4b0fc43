"""The access log: one line per request, written the cheap way.

Each line looks like any other homeport log line (``TIME INFO
homeport.server.access: …``), but it bypasses :mod:`logging`: a log record
per request (the record, the filters, ``strftime`` in the formatter, a
flushed write per line) cost 30% of the exit server's throughput at 100
concurrent visitors (docs/performance.md). Here the timestamp is formatted
once a second, and the lines of one event-loop iteration leave in one write,
after the same secret redaction as every other line.
"""

from __future__ import annotations

import asyncio
import logging
import os
from time import localtime, strftime, time
from typing import Final

from tunnel.log import escape, redact

LOGGER_NAME: Final = "homeport.server.access"
_PREFIX: Final = f"INFO    {LOGGER_NAME}: "
#: Paths longer than this are cut by ``escape``.
_ESCAPE_ABOVE_CHARACTERS: Final = 512


class AccessLog:
    """Writes access lines to a file descriptor (stderr by default), batched per loop iteration."""

    def __init__(self, fd: int = 2, *, enabled: bool | None = None) -> None:
        self.fd = fd
        if enabled is None:
            enabled = logging.getLogger(LOGGER_NAME).isEnabledFor(logging.INFO)
        self.enabled = enabled
        self._lines: list[str] = []
        self._flush_handle: asyncio.Handle | None = None
        self._stamp = ""
        #: when (on the monotonic clock) the wall clock's second ends
        self._stamp_until = 0.0

    def record(
        self,
        client: str,
        method: bytes,
        path: bytes,
        host: str | None,
        status: int,
        bytes_in: int,
        bytes_out: int,
        started_at: float,
        now: float,
    ) -> None:
        """Note one request: who served it, what it was, how it went.

        ``started_at`` and ``now`` are read on the monotonic clock; the
        caller reads ``now`` once for this and the request's counts.

        Only the path is escaped: the method is one llhttp knows (or empty),
        the host was normalised to a host name or IP literal, and the client
        name was checked when it connected.
        """
        if not self.enabled:
            return
        if now >= self._stamp_until:
            self._new_second(now)
        shown = path.decode("latin-1")  # what escape() returns for a printable path
        if (
            len(shown) > _ESCAPE_ABOVE_CHARACTERS
            or not shown.isprintable()
            or '"' in shown
            or "\\" in shown
        ):
            shown = escape(path)
        # Tenths of a millisecond as integers, and an f-string of plain fields:
        # compiled, that is one string built from its parts, where a ``%``
        # format (or a spec such as ``:.1f``) parses its template and formats
        # a float for every line: two thirds of the line's cost, measured.
        tenths = int((now - started_at) * 10_000 + 0.5)
        if tenths < 0:
            tenths = 0
        verb = method.decode("latin-1")
        where = host or "-"
        self._lines.append(
            f'{self._stamp}{_PREFIX}{client} "{verb} {shown}" host={where} status={status}'
            f" in={bytes_in} out={bytes_out} ms={tenths // 10}.{tenths % 10}\n"
        )
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)

    def _new_second(self, now: float) -> None:
        """Format the timestamp once a second, and note when that second ends.

        The wall clock is read only here: a step of it shows in the lines
        of the second after.
        """
        wall = time()
        second = int(wall)
        self._stamp = strftime("%Y-%m-%dT%H:%M:%S ", localtime(second))
        self._stamp_until = now + (second + 1 - wall)

    def flush(self) -> None:
        """Write what was recorded since the last flush."""
        self._flush_handle = None
        if not self._lines:
            return
        text = redact("".join(self._lines))
        self._lines.clear()
        data = text.encode("utf-8", "backslashreplace")
        try:
            while data:
                written = os.write(self.fd, data)
                data = data[written:]
        except BlockingIOError:
            pass  # a full pipe: drop the rest rather than stall the proxy
        except OSError:
            self.enabled = False  # the log is gone (a closed stderr): stop trying
