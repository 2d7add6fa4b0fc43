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
import re
import time
from typing import Final

from tunnel.log import escape, redact

LOGGER_NAME: Final = "homeport.server.access"
_PREFIX: Final = f"INFO    {LOGGER_NAME}: "
#: One line; a single ``%`` (the compiled build turns each field of an
#: f-string into a ``str.format`` call, 15,000 instructions a line).
_LINE: Final = "%s" + _PREFIX + '%s "%s %s" host=%s status=%d in=%d out=%d ms=%.1f\n'
#: What ``escape`` would change in a path: anything else passes as it is.
_NEEDS_ESCAPE: Final = re.compile(rb'[\x00-\x1f\x7f"\\]')
_ESCAPE_ABOVE_BYTES: Final = 512


class AccessLog:
    """Writes access lines to a file descriptor (stderr by default), batched per loop iteration."""

    def __init__(self, fd: int = 2, *, enabled: bool | None = None) -> None:
        self.fd = fd
        if enabled is None:
            enabled = logging.getLogger(LOGGER_NAME).isEnabledFor(logging.INFO)
        self.enabled = enabled
        self._lines: list[str] = []
        self._flush_handle: asyncio.Handle | None = None
        self._second = -1
        self._stamp = ""

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
    ) -> None:
        """Note one request: who served it, what it was, how it went.

        Only the path is escaped: the method is one llhttp knows (or empty),
        the host was normalised to a host name or IP literal, and the client
        name was checked when it connected.
        """
        if not self.enabled:
            return
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S ", time.localtime(second))
        if len(path) > _ESCAPE_ABOVE_BYTES or _NEEDS_ESCAPE.search(path) is not None:
            shown = escape(path)
        else:
            shown = path.decode("latin-1")  # what escape() returns for it, without the call
        duration_ms = (time.monotonic() - started_at) * 1000
        self._lines.append(
            _LINE
            % (
                self._stamp,
                client,
                method.decode("latin-1"),
                shown,
                host or "-",
                status,
                bytes_in,
                bytes_out,
                duration_ms,
            )
        )
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)

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
