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
import time
from typing import Final

from tunnel.log import escape, redact

LOGGER_NAME: Final = "homeport.server.access"
_PREFIX: Final = f"INFO    {LOGGER_NAME}: "


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
        duration_ms = (time.monotonic() - started_at) * 1000
        self._lines.append(
            f'{self._stamp}{_PREFIX}{client} "{method.decode("latin-1")} {escape(path)}" '
            f"host={host or '-'} status={status} in={bytes_in} out={bytes_out} "
            f"ms={duration_ms:.1f}\n"
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
