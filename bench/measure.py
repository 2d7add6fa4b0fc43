"""The measurements: wrk at each concurrency and curl downloads, directly and through the tunnel.

Every wrk measurement follows a warm-up run at the same concurrency whose
figures are dropped: the first requests through a fresh tunnel open streams
and fill caches, which is not what a steady visitor load sees. Before each
tunnel measurement the exit server must report no request in flight, so one
run's leftovers never slow the next.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass

from bench.download import DownloadResult, download
from bench.machine import CpuTimes, MachineCpu
from bench.processes import LOOPBACK, Child
from bench.tools import ToolPaths
from bench.tunnel import REPO_ROOT, Tunnel
from bench.upstream import LARGE_BYTES, LARGE_PATH, SMALL_PATH, Upstream
from bench.wrk import WrkResult, run_wrk, wrk_threads


@dataclass(frozen=True)
class Plan:
    """What to measure and for how long."""

    duration_s: int
    warmup_s: int
    concurrencies: tuple[int, ...]
    max_wrk_threads: int
    downloads: int
    access_log_connections: int | None
    quick: bool


@dataclass(frozen=True)
class Measured:
    """One measured wrk run and the CPU it took."""

    result: WrkResult
    # nginx (with its worker), and through the tunnel the exit server and the
    # client: 100 % is one core.
    process_cpu_percent: dict[str, float]
    machine_cpu: MachineCpu | None


@dataclass(frozen=True)
class HttpPoint:
    """GET /1k at one concurrency, directly and through the tunnel."""

    connections: int
    threads: int
    direct: Measured
    tunnel: Measured


@dataclass(frozen=True)
class AccessLogPoint:
    """GET /1k through a tunnel whose exit server writes its access log."""

    connections: int
    threads: int
    tunnel: Measured


@dataclass(frozen=True)
class Downloads:
    """Single downloads of /100m, directly and through the tunnel, in the order they ran."""

    direct: list[DownloadResult]
    tunnel: list[DownloadResult]


def median_mib_per_s(results: list[DownloadResult]) -> float:
    """The median throughput of ``results``, in MiB/s."""
    return statistics.median(result.mib_per_s for result in results)


def progress(message: str) -> None:
    """A progress line on stderr, so that stdout holds only the table."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def measure_http(
    plan: Plan, tools: ToolPaths, upstream: Upstream, tunnel: Tunnel, connections: int
) -> HttpPoint:
    """GET /1k at ``connections``, directly and then through the tunnel.

    Raises:
        BenchError: wrk failed, a process exited, or the tunnel did not go idle.
    """
    threads = wrk_threads(connections, plan.max_wrk_threads)
    progress(f"GET {SMALL_PATH} c={connections} direct")
    _wrk(tools, upstream.port, connections, threads, plan.warmup_s)
    direct = _measure(plan, tools, upstream.port, connections, threads, _watched(upstream))
    progress(f"GET {SMALL_PATH} c={connections} tunnel")
    through_tunnel = _measure_tunnel(plan, tools, upstream, tunnel, connections, threads)
    return HttpPoint(connections, threads, direct, through_tunnel)


def measure_access_log(
    plan: Plan, tools: ToolPaths, upstream: Upstream, tunnel: Tunnel, connections: int
) -> AccessLogPoint:
    """GET /1k at ``connections`` through a tunnel whose exit server logs every request.

    Raises:
        BenchError: wrk failed, a process exited, or the tunnel did not go idle.
    """
    threads = wrk_threads(connections, plan.max_wrk_threads)
    progress(f"GET {SMALL_PATH} c={connections} tunnel, access log on")
    through_tunnel = _measure_tunnel(plan, tools, upstream, tunnel, connections, threads)
    return AccessLogPoint(connections, threads, through_tunnel)


def measure_downloads(plan: Plan, tools: ToolPaths, direct_port: int, tunnel: Tunnel) -> Downloads:
    """Download /100m ``plan.downloads`` times each way, alternating direct and tunnel.

    One unmeasured download each way comes first: the first one runs measurably
    slower (about 0.6x) both ways, before nginx, the page cache and the
    tunnel's buffers are warm.

    Raises:
        BenchError: a download failed or came back short.
    """
    progress(f"download {LARGE_PATH} warm-up, direct and tunnel")
    download(tools.curl, direct_port, LARGE_PATH, LARGE_BYTES, REPO_ROOT)
    tunnel.wait_idle()
    download(tools.curl, tunnel.visitor_port, LARGE_PATH, LARGE_BYTES, REPO_ROOT)
    direct: list[DownloadResult] = []
    through_tunnel: list[DownloadResult] = []
    for number in range(1, plan.downloads + 1):
        progress(f"download {LARGE_PATH} {number}/{plan.downloads}, direct and tunnel")
        direct.append(download(tools.curl, direct_port, LARGE_PATH, LARGE_BYTES, REPO_ROOT))
        tunnel.wait_idle()
        through_tunnel.append(
            download(tools.curl, tunnel.visitor_port, LARGE_PATH, LARGE_BYTES, REPO_ROOT)
        )
    return Downloads(direct, through_tunnel)


def _watched(upstream: Upstream, tunnel: Tunnel | None = None) -> dict[str, Child]:
    """The long-running processes whose CPU a measurement records, by name."""
    if tunnel is None:
        return {"nginx": upstream.process}
    return {"server": tunnel.server, "client": tunnel.client, "nginx": upstream.process}


def _measure_tunnel(
    plan: Plan,
    tools: ToolPaths,
    upstream: Upstream,
    tunnel: Tunnel,
    connections: int,
    threads: int,
) -> Measured:
    """A warm-up and a measured wrk run through the tunnel, each starting with it idle."""
    tunnel.wait_idle()
    _wrk(tools, tunnel.visitor_port, connections, threads, plan.warmup_s)
    tunnel.wait_idle()
    watched = _watched(upstream, tunnel)
    measured = _measure(plan, tools, tunnel.visitor_port, connections, threads, watched)
    tunnel.wait_idle()
    return measured


@dataclass(frozen=True)
class _CpuReading:
    """CPU counters at one moment: the machine's, ours in total, and each watched process's."""

    machine: CpuTimes | None
    ours_s: float
    processes_s: dict[str, float]

    @staticmethod
    def take(watched: dict[str, Child]) -> _CpuReading:
        """Read the counters now.

        Ours are this process, its reaped children (each finished wrk run) and
        the watched processes with their children (nginx's worker).
        """
        own = os.times()
        processes_s = {name: child.tree_cpu_seconds() for name, child in watched.items()}
        ours_s = own.user + own.system + own.children_user + own.children_system
        return _CpuReading(CpuTimes.read(), ours_s + sum(processes_s.values()), processes_s)


def _measure(
    plan: Plan,
    tools: ToolPaths,
    port: int,
    connections: int,
    threads: int,
    watched: dict[str, Child],
) -> Measured:
    """The measured wrk run, with the CPU each watched process and the machine used."""
    before = _CpuReading.take(watched)
    started = time.monotonic()
    result = _wrk(tools, port, connections, threads, plan.duration_s)
    wall_s = time.monotonic() - started
    after = _CpuReading.take(watched)
    process_cpu_percent = {
        name: 100 * (after.processes_s[name] - before.processes_s[name]) / wall_s
        for name in watched
    }
    machine = MachineCpu.between(before.machine, after.machine, after.ours_s - before.ours_s)
    return Measured(result, process_cpu_percent, machine)


def _wrk(tools: ToolPaths, port: int, connections: int, threads: int, duration_s: int) -> WrkResult:
    """wrk against ``http://127.0.0.1:PORT/1k``."""
    url = f"http://{LOOPBACK}:{port}{SMALL_PATH}"
    return run_wrk(tools.wrk, url, connections, threads, duration_s, REPO_ROOT)
