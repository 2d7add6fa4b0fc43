"""The measurements: wrk at each concurrency, new connections, and curl transfers, for each target.

Every wrk measurement follows a warm-up run at the same concurrency whose
figures are dropped: the first requests through a fresh tunnel open streams
and fill caches, which is not what a steady visitor load sees. Before each
tunnel measurement the tunnel must have no request in flight, so one run's
leftovers never slow the next. The targets take turns at each step (direct,
then homeport, then ssh -R and the peers), so a change in the machine's load between steps
touches every column alike.

A wrk test runs in rounds: each round measures every target once, the one
that went first going last in the next, and each target's figures are those
of its median round by rate. On a shared two-core VM one run of the same
code moves by 10-15 % against the next (the hypervisor's steal, the other
tenants), and a single pair of runs put that noise straight into the ratio
to direct; the median of alternating rounds does not move with one bad
stretch, and the rounds' own ratios show how far the figure can be trusted.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.errors import BenchError
from bench.machine import CpuTimes, MachineCpu
from bench.processes import LOOPBACK, Child
from bench.targets import LABELS, Target
from bench.tools import ToolPaths
from bench.transfer import GIB, TransferResult, download, upload
from bench.tunnel import REPO_ROOT
from bench.upstream import (
    LARGE_BYTES,
    LARGE_PATH,
    SMALL_PATH,
    UPLOAD_PATH,
    Upstream,
    upload_records,
)
from bench.wrk import WrkResult, run_wrk, wrk_threads

KEEP_ALIVE: Final = "keep-alive"
NEW_CONNECTION: Final = "new connection"
CLOSE_HEADER: Final = "Connection: close"
DOWNLOAD: Final = "download"
UPLOAD: Final = "upload"


@dataclass(frozen=True)
class Plan:
    """What to measure and for how long."""

    duration_s: int  # each wrk round
    warmup_s: int
    #: wrk rounds per test, the targets taking turns in each
    rounds: int
    concurrencies: tuple[int, ...]
    max_wrk_threads: int
    new_connection_connections: int
    transfers: int
    access_log_connections: int | None
    stream_counts: tuple[int, ...]
    ssh: bool
    quick: bool
    #: the exit server's build: compiled (HOMEPORT_COMPILE=1, as the exit node
    #: installs it) unless --pure; the client is pure Python, as on the Pi
    compiled: bool = True
    #: the concurrency at which a second tunnel, its control channel over TLS,
    #: takes its turn too (and in the transfers); None to leave it out
    wss_connections: int | None = None
    #: pipenet and PageKite measured beside homeport and ssh -R (bench/peers.py)
    peers: bool = False
    #: two bare relays measured too: what the hops alone allow (bench/floor.py)
    floor: bool = False
    #: the Python the tunnel and the relays run on (--python); None for the
    #: system's python3, as deployed (bench/interpreter.py)
    python: Path | None = None


@dataclass(frozen=True)
class Measured:
    """One measured wrk run, the CPU it took and the tunnel's peak memory during it."""

    result: WrkResult
    # nginx (with its worker), and through a tunnel its server and client sides:
    # 100 % is one core.
    process_cpu_percent: dict[str, float]
    machine_cpu: MachineCpu | None
    # The tunnel's server and client during the run (peak RSS reset just before
    # it); when the reset failed, the peak since the process started.
    peak_rss_bytes: dict[str, int | None]
    peak_rss_reset: bool
    process_cpu_s: dict[str, float]  # CPU seconds of each watched process over the run

    def cpu_us_per_request(self, process: str) -> float | None:
        """CPU microseconds ``process`` spent per completed request (steadier than req/s)."""
        if not self.result.requests or process not in self.process_cpu_s:
            return None
        return 1e6 * self.process_cpu_s[process] / self.result.requests


@dataclass(frozen=True)
class HttpPoint:
    """GET /1k at one concurrency, kept alive or on a new connection each, for every target."""

    kind: str  # KEEP_ALIVE or NEW_CONNECTION
    connections: int
    threads: int
    #: each target's median round by req/s: the figures the report shows
    by_target: dict[str, Measured]
    #: every round, in the order they ran; round i of each target ran in turn with the others'
    rounds: dict[str, tuple[Measured, ...]]

    def round_ratios(self, target: str, direct: str) -> list[float]:
        """req/s of ``target`` over ``direct``'s in each round: how far the median ratio moves."""
        return [
            mine.result.requests_per_s / theirs.result.requests_per_s
            for mine, theirs in zip(self.rounds[target], self.rounds[direct], strict=True)
            if theirs.result.requests_per_s
        ]

    @property
    def test(self) -> str:
        """``GET /1k c=10`` or ``GET /1k c=10, new connection per request``."""
        suffix = ", new connection per request" if self.kind == NEW_CONNECTION else ""
        return f"GET {SMALL_PATH} c={self.connections}{suffix}"


@dataclass(frozen=True)
class AccessLogPoint:
    """GET /1k through a tunnel whose exit server writes its access log."""

    connections: int
    threads: int
    tunnel: Measured


@dataclass(frozen=True)
class TransferRun:
    """One transfer, the CPU each watched process spent on it and how busy the machine was."""

    result: TransferResult
    cpu_s: dict[str, float]
    machine_cpu: MachineCpu | None


@dataclass(frozen=True)
class Transfers:
    """100 MiB downloads or uploads, one at a time, for every target, in the order they ran."""

    kind: str  # DOWNLOAD or UPLOAD
    by_target: dict[str, list[TransferRun]]

    def median_mib_per_s(self, target: str) -> float | None:
        """The median throughput through ``target``, in MiB/s."""
        runs = self.by_target.get(target)
        return statistics.median(run.result.mib_per_s for run in runs) if runs else None

    def cpu_s_per_gib(self, target: str, process: str) -> float | None:
        """CPU seconds ``process`` spent per GiB carried through ``target``, over all runs."""
        runs = self.by_target.get(target) or []
        carried = sum(run.result.bytes for run in runs)
        if not carried or any(process not in run.cpu_s for run in runs):
            return None
        return sum(run.cpu_s[process] for run in runs) / (carried / GIB)


class Dropouts:
    """The peers that failed during the run, each with what went wrong; they are measured no more.

    homeport, direct and ``ssh -R`` are not optional: their failure ends the run.
    A peer is someone else's program, and one that crashes or stalls (they do:
    bench/peers.py) must not cost the run every figure measured so far.
    """

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}

    def active(self, targets: Sequence[Target]) -> list[Target]:
        """``targets`` without the ones that have dropped out."""
        return [target for target in targets if target.key not in self.reasons]

    def drop(self, target: Target, step: str, error: BenchError) -> None:
        """Record that ``target`` failed in ``step``.

        Raises:
            BenchError: ``error`` again, when ``target`` is not optional.
        """
        if not target.optional:
            raise error
        self.leave(target.key, step, error)

    def leave(self, key: str, step: str, error: BenchError) -> None:
        """Record that the peer ``key`` failed in ``step`` (installing or starting it, too)."""
        self.reasons[key] = f"{step}: {error}"
        progress(f"WARNING: {LABELS[key]} leaves the run, it failed in {step}: {error}")


def progress(message: str) -> None:
    """A progress line on stderr, so that stdout holds only the table."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def measure_http(
    plan: Plan,
    tools: ToolPaths,
    targets: Sequence[Target],
    connections: int,
    kind: str = KEEP_ALIVE,
    dropouts: Dropouts | None = None,
) -> HttpPoint:
    """GET /1k at ``connections`` through each target in turn, each after a warm-up.

    With ``kind`` NEW_CONNECTION every request says ``Connection: close``, so
    each one comes on a new connection. A peer that has dropped out is left
    out; one that fails here drops out, its rounds of this test discarded.

    Raises:
        BenchError: wrk failed, a process exited, or a tunnel did not go idle
            (a peer's failure is recorded in ``dropouts`` instead).
    """
    dropouts = dropouts or Dropouts()
    threads = wrk_threads(connections, plan.max_wrk_threads)
    load = _Load(connections, threads, (CLOSE_HEADER,) if kind == NEW_CONNECTION else ())
    what = "new connection per request" if kind == NEW_CONNECTION else "keep-alive"
    targets = dropouts.active(targets)
    rounds: dict[str, list[Measured]] = {target.key: [] for target in targets}
    for number in range(plan.rounds):
        turn = number % len(targets)
        for target in [*targets[turn:], *targets[:turn]]:
            if target.key in dropouts.reasons:
                continue
            progress(
                f"GET {SMALL_PATH} c={connections} {what}, {target.label}, "
                f"round {number + 1}/{plan.rounds}"
            )
            try:
                if number == 0:
                    _warm_up(plan, tools, target, load)
                rounds[target.key].append(_measure_target(plan, tools, target, load))
            except BenchError as error:
                dropouts.drop(target, f"GET {SMALL_PATH} c={connections} {what}", error)
                del rounds[target.key]
    return HttpPoint(
        kind,
        connections,
        threads,
        {key: median_round(runs) for key, runs in rounds.items()},
        {key: tuple(runs) for key, runs in rounds.items()},
    )


def median_round(runs: Sequence[Measured]) -> Measured:
    """The round with the median req/s (the lower of the middle two for an even count).

    One whole round, not a median per figure: its p50, p99, errors and CPU
    belong together.
    """
    ranked = sorted(runs, key=lambda run: run.result.requests_per_s)
    return ranked[(len(ranked) - 1) // 2]


def measure_access_log(
    plan: Plan, tools: ToolPaths, target: Target, connections: int
) -> AccessLogPoint:
    """GET /1k at ``connections`` through a tunnel whose exit server logs every request.

    As many rounds as every other wrk test, the median by rate kept, so it
    compares like with like against the run without the log.

    Raises:
        BenchError: wrk failed, a process exited, or the tunnel did not go idle.
    """
    threads = wrk_threads(connections, plan.max_wrk_threads)
    load = _Load(connections, threads)
    _warm_up(plan, tools, target, load)
    runs = []
    for number in range(plan.rounds):
        progress(
            f"GET {SMALL_PATH} c={connections} {target.label}, access log on, "
            f"round {number + 1}/{plan.rounds}"
        )
        runs.append(_measure_target(plan, tools, target, load))
    return AccessLogPoint(connections, threads, median_round(runs))


def measure_transfers(
    plan: Plan,
    tools: ToolPaths,
    targets: Sequence[Target],
    upstream: Upstream,
    kind: str,
    dropouts: Dropouts | None = None,
) -> Transfers:
    """Download or upload 100 MiB ``plan.transfers`` times through each target, taking turns.

    One unmeasured transfer through each target comes first: the first one runs
    measurably slower (about 0.6x), before nginx, the page cache and the
    tunnel's buffers are warm. Every upload is checked in nginx's upload log:
    it must have answered 200 after reading the whole body.

    A peer that has dropped out is left out; one that fails here drops out,
    its transfers discarded.

    Raises:
        BenchError: a transfer failed, came back short, or nginx did not read
            an upload whole (a peer's failure is recorded in ``dropouts`` instead).
    """
    dropouts = dropouts or Dropouts()
    step = f"{kind} {LARGE_PATH}"
    progress(f"{step} warm-up through each target")
    for target in dropouts.active(targets):
        try:
            target.wait_idle()
            _transfer(tools, target, upstream, kind)
        except BenchError as error:
            dropouts.drop(target, step, error)
    by_target: dict[str, list[TransferRun]] = {t.key: [] for t in dropouts.active(targets)}
    for number in range(1, plan.transfers + 1):
        progress(f"{step} {number}/{plan.transfers} through each target")
        for target in dropouts.active(targets):
            try:
                by_target[target.key].append(_measure_transfer(tools, target, upstream, kind))
            except BenchError as error:
                dropouts.drop(target, step, error)
                del by_target[target.key]
    return Transfers(kind, by_target)


def _measure_transfer(
    tools: ToolPaths, target: Target, upstream: Upstream, kind: str
) -> TransferRun:
    """One measured transfer through ``target``, starting with it idle, and the CPU it took."""
    target.wait_idle()
    watched = target.watched()
    before = _CpuReading.take(watched)
    result = _transfer(tools, target, upstream, kind)
    after = _CpuReading.take(watched)
    cpu_s = {name: after.processes_s[name] - before.processes_s[name] for name in watched}
    machine = MachineCpu.between(before.machine, after.machine, after.ours_s - before.ours_s)
    return TransferRun(result, cpu_s, machine)


def _transfer(tools: ToolPaths, target: Target, upstream: Upstream, kind: str) -> TransferResult:
    """One download of /100m, or one upload of it to /upload checked in nginx's log."""
    headers = _host_header(target)
    if kind == DOWNLOAD:
        return download(tools.curl, target.port, LARGE_PATH, LARGE_BYTES, REPO_ROOT, headers)
    logged = len(upload_records(upstream.upload_log))
    body = upload_body(upstream)
    result = upload(tools.curl, target.port, UPLOAD_PATH, body, REPO_ROOT, headers)
    records = upload_records(upstream.upload_log)
    if len(records) != logged + 1:
        raise BenchError(
            f"upload through {target.label}: nginx logged {len(records) - logged} uploads, "
            "expected 1"
        )
    record = records[-1]
    if record.status != 200 or record.request_length < LARGE_BYTES:
        raise BenchError(
            f"upload through {target.label}: nginx answered {record.status} after reading "
            f"{record.request_length} bytes of request, expected 200 after more than {LARGE_BYTES}"
        )
    return result


def upload_body(upstream: Upstream) -> Path:
    """The file uploads send: the same random 100 MiB that nginx serves as /100m."""
    return upstream.root / "www" / LARGE_PATH.lstrip("/")


@dataclass(frozen=True)
class _Load:
    """What wrk sends: how many connections, from how many threads, with which extra headers."""

    connections: int
    threads: int
    headers: tuple[str, ...] = ()


def _warm_up(plan: Plan, tools: ToolPaths, target: Target, load: _Load) -> None:
    """An unmeasured wrk run through ``target``, starting with it idle."""
    target.wait_idle()
    _wrk(tools, target, load, plan.warmup_s)


def _measure_target(plan: Plan, tools: ToolPaths, target: Target, load: _Load) -> Measured:
    """A measured wrk run through ``target``, starting with it idle."""
    target.wait_idle()
    resets = [side.reset_tree_peak_rss() for side in target.sides.values()]
    watched = target.watched()
    before = _CpuReading.take(watched)
    started = time.monotonic()
    result = _wrk(tools, target, load, plan.duration_s)
    wall_s = time.monotonic() - started
    after = _CpuReading.take(watched)
    peak_rss = {name: side.tree_peak_rss_bytes() for name, side in target.sides.items()}
    target.wait_idle()
    process_cpu_s = {name: after.processes_s[name] - before.processes_s[name] for name in watched}
    process_cpu_percent = {name: 100 * cpu_s / wall_s for name, cpu_s in process_cpu_s.items()}
    machine = MachineCpu.between(before.machine, after.machine, after.ours_s - before.ours_s)
    return Measured(result, process_cpu_percent, machine, peak_rss, all(resets), process_cpu_s)


@dataclass(frozen=True)
class _CpuReading:
    """CPU counters at one moment: the machine's, ours in total, and each watched process's."""

    machine: CpuTimes | None
    ours_s: float
    processes_s: dict[str, float]

    @staticmethod
    def take(watched: dict[str, Child]) -> _CpuReading:
        """Read the counters now.

        Ours are this process, its reaped children (each finished wrk or curl
        run) and the watched processes with their descendants (nginx's worker,
        sshd's connection process).
        """
        own = os.times()
        processes_s = {name: child.tree_cpu_seconds() for name, child in watched.items()}
        ours_s = own.user + own.system + own.children_user + own.children_system
        return _CpuReading(CpuTimes.read(), ours_s + sum(processes_s.values()), processes_s)


def _wrk(tools: ToolPaths, target: Target, load: _Load, duration_s: int) -> WrkResult:
    """wrk against ``http://127.0.0.1:PORT/1k`` of ``target``, with the Host it routes by."""
    url = f"http://{LOOPBACK}:{target.port}{SMALL_PATH}"
    headers = (*load.headers, *_host_header(target))
    return run_wrk(tools.wrk, url, load.connections, load.threads, duration_s, REPO_ROOT, headers)


def _host_header(target: Target) -> tuple[str, ...]:
    """``Host: NAME`` for a target that routes visitors by it; none for the others."""
    return (f"Host: {target.host}",) if target.host else ()
