"""Real processes for end-to-end tests: started, watched by their output, ended by PID."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class Process:
    """A child process whose combined output is collected line by line."""

    def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = args
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._eof = False
        self.popen: subprocess.Popen[str] | None = None

    def start(self) -> Process:
        self.popen = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=self.env,
            cwd=ROOT,
        )
        self._reader = threading.Thread(target=self._read, name=f"read-{self.name}", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.popen is not None
        assert self.popen.stdout is not None
        with self.popen.stdout as stdout:
            for line in stdout:
                with self._changed:
                    self.lines.append(line.rstrip("\n"))
                    self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def mark(self) -> int:
        """A position in the output; wait_for(..., since=mark) looks only after it."""
        with self._changed:
            return len(self.lines)

    def wait_for(self, pattern: str, timeout: float = 15.0, since: int = 0) -> re.Match[str]:
        """Block until a line matching ``pattern`` appears; fail after ``timeout``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[since:]:
                    match = regex.search(line)
                    if match:
                        return match
                since = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._eof:
                    code = self.popen.poll() if self.popen else None
                    tail = "\n".join(self.lines[-60:])
                    raise AssertionError(
                        f"{self.name}: no line matching {pattern!r} within {timeout} s "
                        f"(exit code {code}); output:\n{tail}"
                    )
                self._changed.wait(min(remaining, 0.2))

    async def wait_for_async(
        self, pattern: str, within: float = 15.0, since: int = 0
    ) -> re.Match[str]:
        return await asyncio.to_thread(self.wait_for, pattern, within, since)

    def send_signal(self, signum: int) -> None:
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.popen is not None
        code = self.popen.wait(timeout)
        self._reader.join(5)
        return code

    async def wait_async(self, within: float = 30.0) -> int:
        return await asyncio.to_thread(self.wait, within)

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._reader.join(5)
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)
            self._reader.join(5)

    def rss_bytes(self) -> int:
        """Resident memory of the process, from /proc."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert match is not None
        return int(match.group(1)) * 1024

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks


def homeport(*args: str) -> list[str]:
    """The argv that runs the homeport command line of this checkout."""
    return [sys.executable, "-m", "homeport", *args]


def run_homeport(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run the homeport command line of this checkout to its end; its output, as text."""
    return subprocess.run(
        homeport(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def refused_setting(*args: str) -> str:
    """Run homeport, which must refuse a setting as a user's error (status 2, no traceback).

    Returns its message (stderr), for the test to look for the reason in.
    """
    result = run_homeport(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr
