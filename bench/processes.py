"""Child processes ended by their PID, loopback ports, and waits with deadlines.

Every process the benchmark starts runs in a session (and so a process group)
of its own, whose id is the child's PID. Ctrl-C in the terminal therefore
reaches only the benchmark, which then ends each child itself: SIGTERM to the
group, SIGKILL after a timeout. Ending the group rather than the one process
also ends nginx's worker, which outlives a killed master otherwise. A child is
reaped only at the very end of ``stop()``: until then its PID (the group id)
cannot be reused, so no signal can reach a stranger. sshd puts each connection
in a session of its own, outside the group: those descendants are ended one
by one, by PID, while the leader is still alive to hold them as its children.
Nothing is ever ended by name.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import resource
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Final

from bench.errors import BenchError

LOOPBACK: Final = "127.0.0.1"
STOP_TIMEOUT_S: Final = 10.0
KILL_TIMEOUT_S: Final = 5.0
POLL_INTERVAL_S: Final = 0.05
LOG_TAIL_BYTES: Final = 4000
_KILLED_CODES: Final = (os.CLD_KILLED, os.CLD_DUMPED)
_MAX_DESCENDANTS: Final = 10_000
_TCP_ESTABLISHED: Final = "01"  # the st column of /proc/net/tcp


class Child:
    """One child process with its output sent to a log file (or nowhere)."""

    def __init__(self, name: str, args: list[str], log_path: Path | None, cwd: Path) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> Child:
        """Start the process in a new session, its stdout and stderr going to the log file."""
        with contextlib.ExitStack() as stack:
            output: IO[bytes] | int = subprocess.DEVNULL
            if self.log_path is not None:
                output = stack.enter_context(self.log_path.open("ab"))
            self._popen = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=env,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        """The child's PID, which is also its process group id."""
        if self._popen is None:
            raise BenchError(f"{self.name} was never started")
        return self._popen.pid

    def exit_status(self) -> int | None:
        """The child's exit status once it has exited (minus the signal number if killed).

        Peeks without reaping, so the PID stays the child's until ``stop()``.
        """
        if self._popen is None:
            return None
        if self._popen.returncode is not None:
            return self._popen.returncode
        info = os.waitid(os.P_PID, self._popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is None:
            return None
        return -info.si_status if info.si_code in _KILLED_CODES else info.si_status

    def running(self) -> bool:
        """Whether the child has been started and has not exited."""
        return self._popen is not None and self.exit_status() is None

    def check_running(self) -> None:
        """Raise when the child has exited, quoting the end of its log.

        Raises:
            BenchError: the child is not running.
        """
        if not self.running():
            raise BenchError(f"{self.name} exited (status {self.exit_status()}){self.log_tail()}")

    def log_tail(self) -> str:
        """The last lines of the child's log, ready to append to an error message."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()[-LOG_TAIL_BYTES:]
        text = data.decode("utf-8", "replace").strip()
        return f"; its log ({self.log_path}) ends:\n{text}" if text else ""

    def cpu_seconds(self) -> float:
        """User plus system CPU time the process has used so far, from /proc.

        Raises:
            BenchError: the process has exited.
        """
        self.check_running()
        return _cpu_seconds(self.pid)

    def tree_cpu_seconds(self) -> float:
        """CPU time of the process and of all its descendants so far.

        Descendants are nginx's worker, and sshd's per-connection processes
        (which run in sessions of their own, outside the group we signal).

        Raises:
            BenchError: the process has exited.
        """
        total = self.cpu_seconds()
        for pid in descendant_pids(self.pid):
            with contextlib.suppress(OSError, ValueError, IndexError):  # it just exited
                total += _cpu_seconds(pid)
        return total

    def tree_rss_bytes(self) -> int | None:
        """Resident memory (VmRSS) of the process and its descendants now, or None if unknown."""
        return self._tree_status_bytes("VmRSS")

    def tree_peak_rss_bytes(self) -> int | None:
        """Peak resident memory (VmHWM) of the process and its descendants, summed.

        The peak is since the process started, or since ``reset_tree_peak_rss``.
        """
        return self._tree_status_bytes("VmHWM")

    def reset_tree_peak_rss(self) -> bool:
        """Reset the peak RSS of the process and its descendants (Linux 4.0+); whether it worked."""
        done = True
        for pid in [self.pid, *descendant_pids(self.pid)]:
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                done = False
        return done

    def _tree_status_bytes(self, field: str) -> int | None:
        """A ``kB`` field of /proc/PID/status summed over the process and its descendants."""
        if not self.running():
            return None
        own = status_bytes(self.pid, field)
        if own is None:
            return None
        return own + sum(status_bytes(pid, field) or 0 for pid in descendant_pids(self.pid))

    def wait_exited(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the child to exit (without reaping it)."""
        deadline = time.monotonic() + timeout_s
        while self.running():
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_INTERVAL_S)
        return True

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """End the child's process group: SIGTERM, then SIGKILL if it is not gone in time."""
        if self._popen is None or self._popen.returncode is not None:
            return
        if self.running():
            self._stop_other_sessions(timeout_s)
            _signal_group(self.pid, signal.SIGTERM)
            if not self.wait_exited(timeout_s):
                _signal_group(self.pid, signal.SIGKILL)
                self.wait_exited(KILL_TIMEOUT_S)
        # The leader is a zombie that still holds the group id: whatever is left in
        # its group (an orphaned nginx worker) is killed before the leader is reaped.
        _signal_group(self.pid, signal.SIGKILL)
        self._popen.wait(KILL_TIMEOUT_S)

    def _stop_other_sessions(self, timeout_s: float) -> None:
        """End descendants outside the child's process group (sshd's connections) by PID.

        The child is alive, so each of them is still its descendant (or a
        zombie it has not reaped): their PIDs cannot belong to a stranger.
        """
        strays = [
            pid for pid in descendant_pids(self.pid) if _group_of(pid) not in (None, self.pid)
        ]
        for signum in (signal.SIGTERM, signal.SIGKILL):
            for pid in strays:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
            deadline = time.monotonic() + (
                timeout_s if signum == signal.SIGTERM else KILL_TIMEOUT_S
            )
            while True:
                strays = [pid for pid in strays if pid in descendant_pids(self.pid)]
                if not strays or time.monotonic() >= deadline:
                    break
                time.sleep(POLL_INTERVAL_S)
            if not strays:
                return


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid``, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _group_of(pid: int) -> int | None:
    """The process group of ``pid``, or None when it has gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, ValueError, IndexError):
        return None


def _child_pids(pid: int) -> list[int]:
    """The PIDs of ``pid``'s children, from /proc/PID/task/*/children."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                children += (int(child) for child in (task / "children").read_text().split())
    return children


def descendant_pids(pid: int) -> list[int]:
    """The PIDs of ``pid``'s children, their children, and so on (at most 10,000)."""
    found: list[int] = []
    pending = _child_pids(pid)
    while pending and len(found) < _MAX_DESCENDANTS:
        child = pending.pop()
        found.append(child)
        pending += _child_pids(child)
    return found


def status_bytes(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (``VmRSS``, ``VmHWM``) in bytes, or None."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return None


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    """Send ``signum`` to the process group ``pgid`` if it still has members."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


@contextlib.contextmanager
def running(child: Child, env: dict[str, str] | None = None) -> Iterator[Child]:
    """Start ``child`` and stop it on the way out, whatever happens in between."""
    try:
        yield child.start(env)
    finally:
        child.stop()


def run_bounded(name: str, args: list[str], timeout_s: float, cwd: Path) -> tuple[int, str, str]:
    """Run a short command to completion and return (status, stdout, stderr).

    Raises:
        BenchError: the command did not finish within ``timeout_s``.
    """
    popen = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        stdout, stderr = popen.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{name} did not finish within {timeout_s:.0f} s") from None
    finally:
        if popen.poll() is None:
            _signal_group(popen.pid, signal.SIGTERM)
            try:
                popen.wait(KILL_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _signal_group(popen.pid, signal.SIGKILL)
                popen.wait(KILL_TIMEOUT_S)
    return popen.returncode, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def http_get(
    port: int,
    path: str,
    headers: dict[str, str] | None = None,
    timeout_s: float = 2.0,
    *,
    tls: ssl.SSLContext | None = None,
) -> tuple[int, bytes]:
    """GET ``path`` from 127.0.0.1:``port`` (never through a proxy); return status and body.

    With ``tls``, over TLS with that context.

    Raises:
        OSError: the connection failed or timed out.
        http.client.HTTPException: the answer was not HTTP.
    """
    connection = (
        http.client.HTTPConnection(LOOPBACK, port, timeout=timeout_s)
        if tls is None
        else http.client.HTTPSConnection(LOOPBACK, port, timeout=timeout_s, context=tls)
    )
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_until(
    condition: Callable[[], bool],
    within_s: float,
    what: str,
    interval_s: float = POLL_INTERVAL_S,
) -> None:
    """Return once ``condition()`` is true; raise after ``within_s`` seconds.

    ``condition`` may itself raise (a child that exited) to stop waiting early.

    Raises:
        BenchError: ``what`` did not happen in time.
    """
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() >= deadline:
            raise BenchError(f"{what} did not happen within {within_s:.0f} s")
        time.sleep(interval_s)


def raise_open_files_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE to at least ``wanted``; return the soft limit now in force.

    Children inherit it: the exit server, the client, sshd, ssh and the idle
    upstream each hold one socket per open stream. Raising the hard limit
    needs root; otherwise the soft limit goes as high as the hard one allows.

    Raises:
        BenchError: the limit stays below ``wanted``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    unlimited = resource.RLIM_INFINITY
    new_hard = hard if hard == unlimited or hard >= wanted else wanted
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, new_hard))
    except (ValueError, OSError):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < wanted:
        raise BenchError(
            f"cannot raise the open files limit to {wanted} (it is {soft}); "
            f"run as root or raise it first (ulimit -n {wanted})"
        )
    return soft


def established_connections(port: int) -> int:
    """How many TCP connections to 127.0.0.1:``port`` are established now, from /proc/net/tcp."""
    local = f"0100007F:{port:04X}"
    count = 0
    with contextlib.suppress(OSError), Path("/proc/net/tcp").open() as table:
        next(table, None)  # the header
        for line in table:
            fields = line.split(None, 4)
            if len(fields) > 3 and fields[1] == local and fields[3] == _TCP_ESTABLISHED:
                count += 1
    return count
