"""What the figures were measured on: the machine, the software and the checkout.

Figures from different machines or versions are not comparable; these facts
travel with every result file so that a reader can tell.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Final

from bench.processes import run_bounded
from bench.ssh_tunnel import default_cipher, ssh_version
from bench.tools import ToolPaths
from bench.upstream import nginx_version

PYTHON_PACKAGES: Final = ("homeport", "websockets", "aiohttp", "httptools", "uvloop")
# Tools of the benchmark itself, recorded in the JSON only.
BENCH_PACKAGES: Final = ("matplotlib", "py-spy")
VERSION_TIMEOUT_S: Final = 10.0
IDLE_CHECK_S: Final = 1.0
CLOCK_TICKS_PER_S: Final = os.sysconf("SC_CLK_TCK")
#: Round trips timed by wake_up_round_trip_us, after as many again to warm up.
WAKE_UP_ROUND_TRIPS: Final = 5_000
WAKE_UP_TIMEOUT_S: Final = 10.0
#: The other process of wake_up_round_trip_us: echoes each byte on the socket it is given.
_ECHO: Final = (
    "import socket, sys\n"
    "s = socket.socket(fileno=int(sys.argv[1]))\n"
    "while data := s.recv(1):\n"
    "    s.sendall(data)\n"
)


def machine_info() -> dict[str, Any]:
    """CPU count and model, memory, kernel, and how busy the machine was at the start."""
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _cpuinfo_field("model name"),
        "memory_bytes": _meminfo_bytes("MemTotal"),
        "kernel": platform.release(),
        "load_average_1m_5m_15m": list(os.getloadavg()),
        "cpu_busy_percent_before": cpu_busy_percent(IDLE_CHECK_S),
        "wake_up_round_trip_us": wake_up_round_trip_us(),
    }


def wake_up_round_trip_us(round_trips: int = WAKE_UP_ROUND_TRIPS) -> float | None:
    """The median time a byte takes to another process and back on a socket pair, in µs.

    Each way wakes the process that waits for it, as every hop of a request
    through a tunnel does (six at c=1: wrk, exit server, client, nginx and
    back). What a wake-up costs differs between VMs of the same size by
    more than the code does, and moves every c=1 figure with it
    (docs/performance.md, the run of 2026-11-28T04:09Z): recorded so that
    runs on different machines can be told apart. None if it could not be
    measured.
    """
    ours, theirs = socket.socketpair()
    ours.settimeout(WAKE_UP_TIMEOUT_S)
    try:
        echo = subprocess.Popen(
            [sys.executable, "-c", _ECHO, str(theirs.fileno())], pass_fds=[theirs.fileno()]
        )
    except OSError:
        ours.close()
        theirs.close()
        return None
    theirs.close()
    times: list[int] = []
    try:
        for _ in range(2 * round_trips):
            started = time.perf_counter_ns()
            ours.sendall(b"x")
            if ours.recv(1) != b"x":
                return None
            times.append(time.perf_counter_ns() - started)
    except OSError:
        return None
    finally:
        ours.close()  # the echo reads the end of the stream and exits
        try:
            echo.wait(WAKE_UP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            echo.kill()
            echo.wait()
    timed = sorted(times[round_trips:])
    return timed[len(timed) // 2] / 1000


@dataclass(frozen=True)
class CpuTimes:
    """CPU time of all CPUs since boot, in seconds, from /proc/stat's first line."""

    tasks_s: float  # user, nice, system: what processes ran (guest time is inside user)
    interrupts_s: float  # irq, softirq: loopback TCP's kernel work, counted to no process
    steal_s: float  # taken by the hypervisor: this VM wanted to run and could not
    total_s: float

    @staticmethod
    def read() -> CpuTimes | None:
        """The counters now, or None where /proc/stat cannot be read."""
        try:
            line = Path("/proc/stat").read_text().split("\n", 1)[0]
            user, nice, system, idle, iowait, irq, softirq, steal = (
                int(field) / CLOCK_TICKS_PER_S for field in line.split()[1:9]
            )
        except (OSError, ValueError):
            return None
        tasks, interrupts = user + nice + system, irq + softirq
        return CpuTimes(tasks, interrupts, steal, tasks + interrupts + steal + idle + iowait)


@dataclass(frozen=True)
class MachineCpu:
    """How all CPUs spent an interval; 100 % is every CPU of the machine busy."""

    busy_percent: float
    steal_percent: float
    # Processes that are not ours (the benchmark, wrk, nginx, the exit server and
    # the client): anything above a few percent means the figures are low.
    others_percent: float | None

    @staticmethod
    def between(
        before: CpuTimes | None, after: CpuTimes | None, ours_s: float | None = None
    ) -> MachineCpu | None:
        """The CPU use between two readings, of which ``ours_s`` was ours; None if unknown."""
        if before is None or after is None or after.total_s <= before.total_s:
            return None
        total_s = after.total_s - before.total_s
        tasks_s = after.tasks_s - before.tasks_s
        busy_s = tasks_s + after.interrupts_s - before.interrupts_s
        others_s = None if ours_s is None else max(0.0, tasks_s - ours_s)
        return MachineCpu(
            busy_percent=100 * busy_s / total_s,
            steal_percent=100 * (after.steal_s - before.steal_s) / total_s,
            others_percent=None if others_s is None else 100 * others_s / total_s,
        )


def cpu_busy_percent(window_s: float) -> float | None:
    """How busy all CPUs were over the next ``window_s`` seconds, from /proc/stat.

    A measurement, not a pause: the load average lags by minutes, this says
    whether something else is running now.
    """
    before = CpuTimes.read()
    time.sleep(window_s)
    use = MachineCpu.between(before, CpuTimes.read())
    return use.busy_percent if use is not None else None


def software_versions(tools: ToolPaths, nginx_build: str, repo_root: Path) -> dict[str, Any]:
    """Python, its packages, nginx, wrk, curl and OpenSSH, and the git revision being measured."""
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "packages": {name: _package_version(name) for name in PYTHON_PACKAGES},
        "bench_packages": {name: _package_version(name) for name in BENCH_PACKAGES},
        "nginx": nginx_version(nginx_build),
        "openssh": ssh_version(tools, repo_root),
        "ssh_cipher": default_cipher(tools, repo_root),
        "wrk": _first_line([str(tools.wrk), "--version"], repo_root),
        "curl": _first_line([str(tools.curl), "--version"], repo_root),
        "git": _git_revision(repo_root),
    }


def read_nginx_build(nginx: Path, repo_root: Path) -> str:
    """``nginx -V``: its version and configure arguments (printed on stderr)."""
    _, stdout, stderr = run_bounded("nginx -V", [str(nginx), "-V"], VERSION_TIMEOUT_S, repo_root)
    return (stderr + stdout).strip()


def _cpuinfo_field(name: str) -> str | None:
    """The first value of ``name`` in /proc/cpuinfo."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or None
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def _meminfo_bytes(name: str) -> int | None:
    """A ``kB`` field of /proc/meminfo, in bytes."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition(":")
        if key == name:
            return int(value.split()[0]) * 1024
    return None


def _package_version(name: str) -> str | None:
    """The installed version of a Python distribution, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _first_line(args: list[str], cwd: Path) -> str | None:
    """The first line a ``--version`` command prints (wrk prints it and exits 1)."""
    _, stdout, stderr = run_bounded(args[0], args, VERSION_TIMEOUT_S, cwd)
    lines = (stdout or stderr).strip().splitlines()
    return lines[0].strip() if lines else None


def _git_revision(repo_root: Path) -> dict[str, Any] | None:
    """The commit measured and whether the work tree had changes, if git is there."""
    try:
        code, commit, _ = run_bounded("git", ["git", "rev-parse", "HEAD"], 10.0, repo_root)
        _, changes, _ = run_bounded("git", ["git", "status", "--porcelain"], 10.0, repo_root)
    except OSError:
        return None
    if code != 0:
        return None
    return {"commit": commit.strip(), "dirty": bool(changes.strip())}
