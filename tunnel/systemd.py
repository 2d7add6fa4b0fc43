"""Telling systemd how the process is (``sd_notify``): one datagram per message.

Under a unit with ``Type=notify`` systemd counts the service as started when
``READY=1`` arrives, and with ``WatchdogSec=`` it restarts the service unless
``WATCHDOG=1`` arrives at least that often. The pings are sent from the
event loop, so a loop stuck in a blocking call stops them: the one failure
that no heartbeat inside the process can see, and that would otherwise leave
a Pi with a live process and no tunnel until someone noticed.

Outside systemd (no ``NOTIFY_SOCKET``) every call does nothing. The
protocol is a few lines; libsystemd's Python bindings would be a compiled
dependency for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

logger = logging.getLogger("homeport.systemd")


class Notifier:
    """``READY=1`` once, then ``WATCHDOG=1`` at half the watchdog's interval."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        self.address = address or None
        #: seconds between pings, or None when systemd watches nothing
        self.watchdog_interval_s: float | None = None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        if self.address and usec.isdigit() and int(usec) > 0 and pid in ("", str(os.getpid())):
            self.watchdog_interval_s = int(usec) / 1e6 / 2
        self._timer: asyncio.TimerHandle | None = None

    def notify(self, message: str) -> None:
        """Send one message; never fails the caller (a missed ping is systemd's to judge)."""
        if self.address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(message.encode(), self.address)
        except OSError as exc:
            logger.warning("could not notify systemd (%s): %s", message, exc.strerror or exc)

    def ready(self) -> None:
        """The service is up: say so, and start the watchdog's pings on the running loop."""
        self.notify("READY=1")
        if self.watchdog_interval_s is not None and self._timer is None:
            self._ping()

    def stopping(self) -> None:
        """Shutting down (the pings go on: a drain may take a while, and may stall too)."""
        self.notify("STOPPING=1")

    def _ping(self) -> None:
        assert self.watchdog_interval_s is not None
        self.notify("WATCHDOG=1")
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.watchdog_interval_s, self._ping)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
