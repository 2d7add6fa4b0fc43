"""Headless Chromium in a namespace, driven over the DevTools protocol on a pipe.

Why the DevTools protocol and not ``chromium --dump-dom --virtual-time-budget``:
virtual time waits for pending *fetches*, but not for a WebSocket's echo, and
it lets the page's clock run ahead of the network, so whether the dump shows
the WebSocket's answer would depend on timing. Here the test waits for a
condition in the page itself (``body[data-state]`` leaves ``pending``), with a
deadline, then reads the DOM, the network log and a screenshot from the same
page load.

Why a pipe (``--remote-debugging-pipe``: commands on fd 3, replies on fd 4,
NUL-terminated JSON): Chromium runs in the visitor namespace, where a
DevTools TCP port would be out of the test's reach; inherited pipe ends do not
care which network namespace their process lives in.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from tests.topology.bed import Namespace

CHROMIUM_FLAGS: Final = (
    "--headless",
    "--no-sandbox",  # we are root
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",  # without these it tries to reach Google and stalls
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
    "--window-size=1024,768",
)
# Put our pipe ends on the descriptors Chromium reads and writes DevTools messages on
# (bash, not dash: dash cannot redirect from descriptors above 9).
_ON_FDS_3_AND_4: Final = 'r=$1; w=$2; shift 2; exec "$@" 3<&"$r" 4>&"$w"'


class DevToolsError(Exception):
    """Chromium answered a command with an error, or not in time."""


class Browser:
    """One Chromium process; use as a context manager, open pages with :meth:`open`."""

    def __init__(self, namespace: Namespace, profile: Path, log: Path) -> None:
        self.namespace = namespace
        self.profile = profile
        self.log = log
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        self._buffer = b""
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Browser:
        to_chromium_r, self._to_chromium = os.pipe()
        self._from_chromium, from_chromium_w = os.pipe()
        self.profile.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self._process = subprocess.Popen(
                self.namespace.argv(
                    "bash", "-c", _ON_FDS_3_AND_4, "chromium",
                    str(to_chromium_r), str(from_chromium_w),
                    "chromium", *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
                ),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(to_chromium_r, from_chromium_w),
            )  # fmt: skip
        os.close(to_chromium_r)
        os.close(from_chromium_w)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._process is not None
        with contextlib.suppress(DevToolsError, OSError):
            self.command("Browser.close", within=5)
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(5)
        os.close(self._to_chromium)
        os.close(self._from_chromium)

    # -- the protocol ------------------------------------------------------------------

    def command(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: str | None = None,
        within: float = 15.0,
    ) -> dict[str, Any]:
        """Send one command and return its result; events that arrive meanwhile are kept.

        Raises:
            DevToolsError: Chromium answered with an error, exited, or did not answer in time.
        """
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_chromium, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + within
        while True:
            reply = self._receive(deadline, method)
            if reply.get("id") != self._next_id:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise DevToolsError(f"{method}: {reply['error']}")
            result: dict[str, Any] = reply["result"]
            return result

    def _receive(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DevToolsError(f"no answer to {waiting_for} in time")
            readable, _, _ = select.select([self._from_chromium], [], [], remaining)
            if readable:
                data = os.read(self._from_chromium, 1 << 20)
                if not data:
                    raise DevToolsError(f"Chromium exited; see {self.log}")
                self._buffer += data
        message, _, self._buffer = self._buffer.partition(b"\0")
        parsed: dict[str, Any] = json.loads(message)
        return parsed

    # -- pages -------------------------------------------------------------------------

    def open(self, url: str) -> Page:
        """Open a tab, watch its network traffic, and navigate it to ``url``."""
        target = self.command("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.command("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        page = Page(self, session)
        page.command("Network.enable")
        page.command("Page.enable")
        page.command("Page.navigate", {"url": url})
        return page


class Page:
    """A tab, as a DevTools session."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    def command(
        self, method: str, params: dict[str, Any] | None = None, within: float = 15.0
    ) -> dict[str, Any]:
        return self.browser.command(method, params, session=self.session, within=within)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able values only)."""
        result = self.command("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise DevToolsError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_until(self, expression: str, within: float) -> None:
        """Wait until a JavaScript expression is true in the page."""
        deadline = time.monotonic() + within
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise AssertionError(f"{expression!r} still false after {within} s")
            time.sleep(0.1)

    def screenshot(self, path: Path) -> None:
        data = self.command("Page.captureScreenshot", {"format": "png"})["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def network(self, method: str) -> list[dict[str, Any]]:
        """The parameters of every event ``method`` (e.g. ``Network.responseReceived``) so far."""
        return [
            event["params"]
            for event in self.browser.events
            if event.get("method") == method and event.get("sessionId") == self.session
        ]
