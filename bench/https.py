"""``python -m bench.https``: homeport's HTTPS port for visitors, against nginx's own TLS.

One nginx serves ``/1k`` and the 100 MiB file on a plain port and on a TLS
port (TLS 1.3, a self-signed EC P-256 certificate naming 127.0.0.1); one
tunnel in front of it serves visitors on its HTTP port and on its HTTPS port
(``--https-cert``/``--https-key``, the same certificate), the exit server
compiled and the client pure Python, as ``make bench`` runs them. Four ways
take turns in every round, each going first in turn: nginx over HTTP,
homeport's HTTP port, nginx over HTTPS and homeport's HTTPS port. Each
figure is read against direct nginx of the same scheme in the same round
(HTTPS against HTTPS, HTTP against HTTP), with the CPU the exit server, the
client and nginx spent per request, per connection or per GiB.

The workloads:

- ``GET /1k`` kept alive, with wrk at each ``--concurrency`` (1 and 100);
- a new connection per request, with wrk at c=10 and ``Connection: close``.
  wrk keeps each connection's TLS session and offers it on the next one,
  and both servers take it (a TLS 1.3 ticket): a resumed handshake, with no
  certificate and no signature, what a returning browser does;
- a full TLS handshake per request, with ``openssl s_time -new`` (one
  connection at a time, a new session each, ``GET /1k HTTP/1.0``), over
  HTTPS only;
- a 100 MiB download with curl (``--cacert``: the certificate is checked).

Before measuring it checks that the two HTTPS ports agree on the same
protocol and cipher and both resume a session. Every measurement also
reads the whole machine's CPU counters, so the summary says how much CPU
other processes took meanwhile: on a shared VM that is what makes a
figure low. Every process is ended by its PID on the way out, Ctrl-C
included.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.errors import BenchError, run_command
from bench.interpreter import tunnel_python
from bench.machine import IDLE_CHECK_S, CpuTimes, MachineCpu, cpu_busy_percent, read_nginx_build
from bench.measure import CLOSE_HEADER, progress
from bench.processes import LOOPBACK, Child, run_bounded
from bench.report import OTHERS_CPU_PERCENT, STEAL_CPU_PERCENT
from bench.tools import Tool, ensure_tools, find_tool, install
from bench.transfer import GIB, MIB, download
from bench.tunnel import REPO_ROOT, Build, Tunnel, compile_bytecode, compiled_tree, run_tunnel
from bench.upstream import (
    LARGE_BYTES,
    LARGE_PATH,
    SMALL_BYTES,
    SMALL_PATH,
    Upstream,
    run_nginx,
    verifying_context,
    write_site,
)
from bench.wrk import load_arguments, parse_load_arguments, run_wrk
from tunnel.tls import Certificate, ensure_self_signed

DEFAULT_ROUNDS: Final = 2
WARMUP_S: Final = 1
#: wrk's connections in the new-connection workload, as ``make bench`` opens them
NEW_CONNECTION_CONNECTIONS: Final = 10
HTTP: Final = "http"
HTTPS: Final = "https"
DIRECT: Final = "direct"
HOMEPORT: Final = "homeport"
#: the processes whose CPU is read: nginx with its worker, the two sides of the tunnel
NGINX: Final = "nginx"
EXIT_SERVER: Final = "exit server"
CLIENT: Final = "client"
OPENSSL: Final = Tool("openssl", ("openssl",), "openssl")
S_TIME_TIMEOUT_S: Final = 30.0
PROBE_TIMEOUT_S: Final = 5.0
#: s_time's last line: its "real seconds" are whole, so the rate is timed here instead
_S_TIME_TOTALS: Final = re.compile(
    r"^(\d+) connections in \d+ real seconds, (\d+) bytes read per connection", re.MULTILINE
)
# What s_time asks for on each connection (its -www page).
_HTTP_1_0_REQUEST: Final = f"GET {SMALL_PATH} HTTP/1.0\r\n\r\n".encode()


@dataclass(frozen=True)
class Way:
    """Where a visitor connects: nginx itself or the tunnel, over plain HTTP or HTTPS."""

    through: str  # DIRECT or HOMEPORT
    scheme: str  # HTTP or HTTPS

    @property
    def key(self) -> str:
        """``homeport https``."""
        return f"{self.through} {self.scheme}"

    @property
    def direct(self) -> Way:
        """Direct nginx over the same scheme: what this way is read against."""
        return Way(DIRECT, self.scheme)


WAYS: Final = (Way(DIRECT, HTTP), Way(HOMEPORT, HTTP), Way(DIRECT, HTTPS), Way(HOMEPORT, HTTPS))


KEEP_ALIVE: Final = "keep-alive"
NEW_CONNECTION: Final = "new connection"
FULL_HANDSHAKE: Final = "full handshake"
DOWNLOAD: Final = "download"


@dataclass(frozen=True)
class Workload:
    """One thing measured through every way, and the units it is read in."""

    kind: str  # KEEP_ALIVE, NEW_CONNECTION, FULL_HANDSHAKE or DOWNLOAD
    connections: int = 1

    @property
    def label(self) -> str:
        """``GET /1k c=100, keep-alive``."""
        if self.kind == DOWNLOAD:
            return f"{LARGE_BYTES // MIB} MiB download"
        if self.kind == FULL_HANDSHAKE:
            return f"new connection per GET, c={self.connections}, full TLS handshake (s_time)"
        if self.kind == NEW_CONNECTION:
            return f"new connection per GET, c={self.connections}, TLS session resumed"
        return f"GET {SMALL_PATH} c={self.connections}, keep-alive"

    @property
    def rate_unit(self) -> str:
        """What the rate counts: req/s, conn/s or MiB/s."""
        return {KEEP_ALIVE: "req/s", DOWNLOAD: "MiB/s"}.get(self.kind, "conn/s")

    @property
    def rate_digits(self) -> int:
        return 1 if self.kind == DOWNLOAD else 0

    @property
    def cost_unit(self) -> str:
        """CPU per request or connection in µs, per GiB in CPU seconds."""
        return {KEEP_ALIVE: "µs/req", DOWNLOAD: "CPU-s/GiB"}.get(self.kind, "µs/conn")

    @property
    def cost_digits(self) -> int:
        return 2 if self.kind == DOWNLOAD else 0

    @property
    def schemes(self) -> tuple[str, ...]:
        """HTTP and HTTPS; a full TLS handshake only over HTTPS."""
        return (HTTPS,) if self.kind == FULL_HANDSHAKE else (HTTP, HTTPS)

    def ways(self) -> tuple[Way, ...]:
        """The ways this workload goes through."""
        return tuple(way for way in WAYS if way.scheme in self.schemes)


@dataclass(frozen=True)
class Sample:
    """One measurement through one way: its rate, and how much CPU went where."""

    rate: float
    #: CPU per unit (the workload's cost unit) of each watched process
    cost: Mapping[str, float]
    #: the load generator's (wrk, s_time, curl) CPU, 100 is one core
    load_cpu_percent: float
    machine: MachineCpu | None


#: one round of a workload: each way's sample, by Way.key
Round = Mapping[str, Sample]


def turn(ways: Sequence[Way], number: int) -> tuple[Way, ...]:
    """``ways`` in round ``number``'s order: each goes first in turn."""
    shift = number % len(ways)
    return (*ways[shift:], *ways[:shift])


def ratio(rounds: Round, way: Way) -> float:
    """``way``'s rate over direct nginx's of the same scheme, in the same round."""
    direct = rounds[way.direct.key].rate
    return rounds[way.key].rate / direct if direct else 0.0


def span(values: Sequence[float], digits: int = 0, *, signed: bool = False) -> str:
    """``values`` as a range, ``0.37-0.39`` (``+3 to +5`` when ``signed``), or one figure.

    One figure when they all read the same; ``-`` when there are none.
    """
    if not values:
        return "-"
    spec = f"{'+' if signed else ''},.{digits}f"
    low, high = format(min(values), spec), format(max(values), spec)
    if low == high:
        return low
    return f"{low} to {high}" if signed else f"{low}-{high}"


def format_round(workload: Workload, number: int, rounds: Round) -> list[str]:
    """The lines of one round: per scheme, direct nginx and homeport, with their CPU.

    ``HTTPS  direct 9,876 (nginx 45 µs/req; wrk 99 %)   homeport 3,456 = 0.35
    (exit server 110, client 70 µs/req; wrk 40 %)``: the rates, homeport's
    ratio to direct nginx of the same scheme, each process's CPU per unit and
    the load generator's CPU (100 % is one core: at 100 % it, not the server,
    set the rate); ``!! others 12 %`` when other processes took more of the
    CPUs than bench/report.py allows meanwhile.
    """
    lines = [f"{workload.label}, {workload.rate_unit}, round {number + 1}"]
    for scheme in workload.schemes:
        direct, tunnel = rounds[f"{DIRECT} {scheme}"], rounds[f"{HOMEPORT} {scheme}"]
        lines.append(
            f"  {scheme.upper():<5}  direct {direct.rate:,.{workload.rate_digits}f} "
            f"({NGINX} {_cost(direct, NGINX, workload)} {workload.cost_unit}; "
            f"load {direct.load_cpu_percent:.0f} %{_others(direct)})   "
            f"homeport {tunnel.rate:,.{workload.rate_digits}f} = "
            f"{ratio(rounds, Way(HOMEPORT, scheme)):.2f} "
            f"({EXIT_SERVER} {_cost(tunnel, EXIT_SERVER, workload)}, "
            f"{CLIENT} {_cost(tunnel, CLIENT, workload)} {workload.cost_unit}; "
            f"load {tunnel.load_cpu_percent:.0f} %{_others(tunnel)})"
        )
    return lines


def _others(sample: Sample) -> str:
    """``; !! others 12 %`` when other processes took too much of the CPUs during ``sample``."""
    machine = sample.machine
    if machine is None or machine.others_percent is None:
        return ""
    if machine.others_percent <= OTHERS_CPU_PERCENT:
        return ""
    return f"; !! others {machine.others_percent:.0f} %"


def _cost(sample: Sample, process: str, workload: Workload) -> str:
    value = sample.cost.get(process)
    return "-" if value is None else f"{value:,.{workload.cost_digits}f}"


_SUMMARY_COLUMNS: Final = (
    ("", 11),
    ("direct", 17),
    ("nginx CPU", 13),
    ("homeport", 17),
    ("ratio", 11),
    ("exit server CPU", 17),
    ("client CPU", 13),
)


def summary(results: Mapping[Workload, Sequence[Round]]) -> list[str]:
    """The table of every workload over all its rounds: each figure's range, round by round.

    Per workload one row per scheme (the rates, homeport's ratio to direct nginx
    of that scheme, and the CPU per unit of nginx serving directly, of the
    exit server and of the client), then with both schemes an ``HTTPS/HTTP``
    row: each one's HTTPS rate over its HTTP rate in the same round, and the
    CPU per unit that HTTPS added to nginx and to the exit server.
    """
    lines = ["  ".join(f"{name:<{width}}" for name, width in _SUMMARY_COLUMNS).rstrip()]
    for workload, rounds in results.items():
        if not rounds:
            continue
        lines.append(f"{workload.label} ({workload.rate_unit}; CPU in {workload.cost_unit})")
        digits = workload.rate_digits
        for scheme in workload.schemes:
            direct, tunnel = f"{DIRECT} {scheme}", f"{HOMEPORT} {scheme}"
            lines.append(
                _summary_row(
                    scheme.upper(),
                    span([one[direct].rate for one in rounds], digits),
                    span(_costs(rounds, direct, NGINX), workload.cost_digits),
                    span([one[tunnel].rate for one in rounds], digits),
                    span([ratio(one, Way(HOMEPORT, scheme)) for one in rounds], 2),
                    span(_costs(rounds, tunnel, EXIT_SERVER), workload.cost_digits),
                    span(_costs(rounds, tunnel, CLIENT), workload.cost_digits),
                )
            )
        if set(workload.schemes) == {HTTP, HTTPS}:
            lines.append(
                _summary_row(
                    "HTTPS/HTTP",
                    span([_over_http(one, DIRECT) for one in rounds], 2),
                    span(_added(rounds, DIRECT, NGINX), workload.cost_digits, signed=True),
                    span([_over_http(one, HOMEPORT) for one in rounds], 2),
                    "",
                    span(_added(rounds, HOMEPORT, EXIT_SERVER), workload.cost_digits, signed=True),
                    span(_added(rounds, HOMEPORT, CLIENT), workload.cost_digits, signed=True),
                )
            )
    return lines


def _summary_row(*cells: str) -> str:
    return "  ".join(
        f"{cell:<{width}}" for cell, (_, width) in zip(cells, _SUMMARY_COLUMNS, strict=True)
    ).rstrip()


def _costs(rounds: Sequence[Round], way: str, process: str) -> list[float]:
    return [one[way].cost[process] for one in rounds if process in one[way].cost]


def _over_http(rounds: Round, through: str) -> float:
    """``through``'s HTTPS rate over its HTTP rate in this round."""
    plain = rounds[f"{through} {HTTP}"].rate
    return rounds[f"{through} {HTTPS}"].rate / plain if plain else 0.0


def _added(rounds: Sequence[Round], through: str, process: str) -> list[float]:
    """The CPU per unit ``process`` spent over HTTPS beyond what it spent over HTTP, per round."""
    secure, plain = f"{through} {HTTPS}", f"{through} {HTTP}"
    return [
        one[secure].cost[process] - one[plain].cost[process]
        for one in rounds
        if process in one[secure].cost and process in one[plain].cost
    ]


def load_note(results: Mapping[Workload, Sequence[Round]]) -> list[str]:
    """How busy the machine was with other work during the measurements, and a warning if too.

    Other processes' share and the hypervisor's steal, each as the median and
    the largest over every measurement; above bench/report.py's thresholds
    the figures are low by an unknown amount.
    """
    machines = [
        sample.machine
        for rounds in results.values()
        for one in rounds
        for sample in one.values()
        if sample.machine is not None
    ]
    others = [use.others_percent for use in machines if use.others_percent is not None]
    steal = [use.steal_percent for use in machines]
    if not others:
        return ["the machine's CPU counters could not be read: how busy it was is unknown"]
    lines = [
        f"other processes used {statistics.median(others):.1f} % of the CPUs during the median "
        f"measurement, {max(others):.1f} % at most; the hypervisor's steal "
        f"{statistics.median(steal):.1f} %, {max(steal):.1f} % at most "
        f"({len(machines)} measurements)"
    ]
    if max(others) > OTHERS_CPU_PERCENT or max(steal) > STEAL_CPU_PERCENT:
        lines.append(
            f"!! OTHER LOAD ON THE MACHINE: over {OTHERS_CPU_PERCENT:.0f} % in some measurements;"
            " their figures are low by an unknown amount"
        )
    return lines


@dataclass(frozen=True)
class STimeResult:
    """``openssl s_time``'s totals: connections made, and the bytes each read on average."""

    connections: int
    bytes_per_connection: int


def parse_s_time(output: str) -> STimeResult:
    """Read the connection count and bytes per connection out of s_time's report.

    Raises:
        BenchError: the report has no totals line.
    """
    totals = _S_TIME_TOTALS.search(output)
    if totals is None:
        raise BenchError(f"cannot read openssl s_time's report: {output.strip()[-400:]!r}")
    return STimeResult(int(totals[1]), int(totals[2]))


def s_time_args(openssl: Path, port: int, duration_s: int) -> list[str]:
    """``openssl s_time`` making a new session on every connection to ``port`` for ``duration_s``.

    It asks each for ``GET /1k HTTP/1.0`` and reads the answer until the
    server closes. It checks no certificate, as wrk does not.
    """
    return [
        str(openssl),
        "s_time",
        "-connect",
        f"{LOOPBACK}:{port}",
        "-new",
        "-www",
        SMALL_PATH,
        "-time",
        str(duration_s),
    ]


# --- the measurements ---


def main(argv: Sequence[str] | None = None) -> int:
    """Measure nginx and the tunnel over HTTP and HTTPS; print each round and a summary."""
    args = parse_args(argv)
    status, _ = run_command("bench.https", lambda: measure(args))
    return status


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = load_arguments(
        "python -m bench.https",
        "homeport's HTTPS port against nginx over TLS, and its HTTP port against nginx.",
        runs="the tunnel",
        default_rounds=DEFAULT_ROUNDS,
    )
    return parse_load_arguments(parser, argv)


def planned_workloads(concurrencies: Sequence[int]) -> list[Workload]:
    """Every workload, in the order they run."""
    return [
        *(Workload(KEEP_ALIVE, connections) for connections in concurrencies),
        Workload(NEW_CONNECTION, NEW_CONNECTION_CONNECTIONS),
        Workload(FULL_HANDSHAKE),
        Workload(DOWNLOAD),
    ]


def estimated_s(workloads: Sequence[Workload], rounds: int, duration_s: int) -> float:
    """About how long the measurements take: each wrk or s_time run, and a second per download.

    Every way of every workload has one unmeasured run, then one per round; each
    run takes about half a second more than it measures (starting the tool,
    waiting for the tunnel to be idle).
    """
    total = 0.0
    for workload in workloads:
        measured, warmup = (1.0, 1.0) if workload.kind == DOWNLOAD else (duration_s, WARMUP_S)
        total += len(workload.ways()) * (warmup + rounds * measured + (1 + rounds) * 0.5)
    return total


def measure(args: argparse.Namespace) -> None:
    """Start nginx and the tunnel, and print one row per round and a summary.

    Raises:
        BenchError: a tool or a process failed, or a way did not serve.
    """
    tools = ensure_tools()
    openssl = _ensure_openssl()
    nginx_build = read_nginx_build(tools.nginx, REPO_ROOT)
    python = tunnel_python(args.python)
    compile_bytecode()
    progress("building the exit server's compiled modules (HOMEPORT_COMPILE=1)")
    build = Build(python.executable, compiled_tree(python))
    compile_bytecode(build.server_tree)
    workloads = planned_workloads(args.concurrency)
    minutes = estimated_s(workloads, args.rounds, args.duration) / 60
    print(f"the tunnel runs on {python.description}, the exit server compiled")
    busy = cpu_busy_percent(IDLE_CHECK_S)
    if busy is not None:
        print(f"the CPUs were {busy:.0f} % busy in the second before the run")
    progress(f"measuring for about {minutes:.0f} minutes")
    with tempfile.TemporaryDirectory(prefix="homeport-https-") as temp:
        workdir = Path(temp)
        small_body = write_site(workdir)
        certificate = ensure_self_signed(workdir / "certificate", [LOOPBACK])
        with (
            run_nginx(tools.nginx, workdir, nginx_build, small_body, certificate) as upstream,
            run_tunnel(
                workdir, upstream.url, small_body, label="https", build=build, https=certificate
            ) as tunnel,
        ):
            bench = _Bench(tools.wrk, tools.curl, openssl, upstream, tunnel, certificate, workdir)
            for line in bench.check_tls():
                print(line)
            print(
                "each round: the rate, its ratio to direct nginx of the same scheme, and CPU "
                "per unit: nginx's (direct), the exit server's/the client's (homeport)"
            )
            results: dict[Workload, list[Round]] = {}
            for workload in workloads:
                results[workload] = bench.run(workload, args.rounds, args.duration)
    print()
    for line in [*summary(results), *load_note(results)]:
        print(line)


def _ensure_openssl() -> Path:
    """The ``openssl`` command (s_time), installed with apt-get when missing.

    Raises:
        BenchError: it is missing and cannot be installed here.
    """
    found = find_tool(OPENSSL.name)
    if found is None:
        install([OPENSSL])
        found = find_tool(OPENSSL.name)
    if found is None:
        raise BenchError("openssl is still missing after apt-get install")
    return found


@dataclass(frozen=True)
class _Reading:
    """CPU counters at one moment: the machine's, ours, the load generator's and each process's."""

    machine: CpuTimes | None
    ours_s: float
    children_s: float  # our reaped children: each finished wrk, s_time or curl
    processes_s: dict[str, float]

    @staticmethod
    def take(watched: Mapping[str, Child]) -> _Reading:
        own = os.times()
        processes_s = {name: child.tree_cpu_seconds() for name, child in watched.items()}
        children_s = own.children_user + own.children_system
        ours_s = own.user + own.system + children_s + sum(processes_s.values())
        return _Reading(CpuTimes.read(), ours_s, children_s, processes_s)


@dataclass(frozen=True)
class _Measured:
    """What one run of a load generator measured, before its CPU is read against it."""

    rate: float
    units: float  # requests, connections or GiB
    cost_scale: float  # CPU seconds per unit times this is the cost: 1e6 for µs


class _Bench:
    """The running nginx and tunnel, and how to put each workload through each way."""

    def __init__(
        self,
        wrk: Path,
        curl: Path,
        openssl: Path,
        upstream: Upstream,
        tunnel: Tunnel,
        certificate: Certificate,
        workdir: Path,
    ) -> None:
        assert upstream.tls_port is not None
        assert tunnel.https_port is not None
        self.wrk, self.curl, self.openssl = wrk, curl, openssl
        self.tunnel = tunnel
        self.certificate = certificate
        self.workdir = workdir
        self.ports = {
            Way(DIRECT, HTTP).key: upstream.port,
            Way(HOMEPORT, HTTP).key: tunnel.visitor_port,
            Way(DIRECT, HTTPS).key: upstream.tls_port,
            Way(HOMEPORT, HTTPS).key: tunnel.https_port,
        }
        self.watched = {NGINX: upstream.process, EXIT_SERVER: tunnel.server, CLIENT: tunnel.client}
        #: what s_time must read per connection through each HTTPS way (found by check_tls)
        self.answer_bytes: dict[str, int] = {}

    def check_tls(self) -> list[str]:
        """Check that both HTTPS ports agree on protocol and cipher and resume sessions.

        Raises:
            BenchError: a port failed the check, or the two differ.
        """
        seen = {}
        for way in (Way(DIRECT, HTTPS), Way(HOMEPORT, HTTPS)):
            probe = _probe_tls(self.ports[way.key], verifying_context(self.certificate))
            self.answer_bytes[way.key] = probe.answer_bytes
            seen[way.key] = (probe.version, probe.cipher)
            if not probe.resumed:
                raise BenchError(f"{way.key} did not resume a TLS session")
        if len(set(seen.values())) != 1:
            raise BenchError(f"the HTTPS ports negotiated differently: {seen}")
        version, cipher = next(iter(seen.values()))
        return [f"both HTTPS ports: {version}, {cipher}, a session resumed on a new connection"]

    def run(self, workload: Workload, rounds: int, duration_s: int) -> list[Round]:
        """Warm each way up, then ``rounds`` rounds through every way in turn, each printed."""
        once = self._measurement(workload)
        for way in workload.ways():
            self._wait_idle(way)
            once(way, WARMUP_S)
        done: list[Round] = []
        for number in range(rounds):
            samples = {}
            for way in turn(workload.ways(), number):
                progress(f"{workload.label} through {way.key}")
                self._wait_idle(way)
                samples[way.key] = self._sampled(way, functools.partial(once, way, duration_s))
            done.append(samples)
            print("\n".join(format_round(workload, number, samples)), flush=True)
        return done

    def _measurement(self, workload: Workload) -> Callable[[Way, int], _Measured]:
        """How ``workload`` measures a way for some seconds."""
        if workload.kind == DOWNLOAD:
            return lambda way, _: self._download(way)
        if workload.kind == FULL_HANDSHAKE:
            return self._s_time
        headers = (CLOSE_HEADER,) if workload.kind == NEW_CONNECTION else ()
        return lambda way, seconds: self._wrk(way, workload.connections, seconds, headers)

    def _sampled(self, way: Way, work: Callable[[], _Measured]) -> Sample:
        """Run ``work`` with the CPU counters read around it."""
        before = _Reading.take(self.watched)
        started = time.monotonic()
        measured = work()
        wall_s = time.monotonic() - started
        after = _Reading.take(self.watched)
        mine = (NGINX,) if way.through == DIRECT else (EXIT_SERVER, CLIENT)
        cost = {
            name: measured.cost_scale
            * (after.processes_s[name] - before.processes_s[name])
            / max(measured.units, 1e-9)
            for name in mine
        }
        load_percent = 100 * (after.children_s - before.children_s) / wall_s
        machine = MachineCpu.between(before.machine, after.machine, after.ours_s - before.ours_s)
        return Sample(measured.rate, cost, load_percent, machine)

    def _wait_idle(self, way: Way) -> None:
        if way.through == HOMEPORT:
            self.tunnel.wait_idle()

    def _url(self, way: Way, path: str) -> str:
        return f"{way.scheme}://{LOOPBACK}:{self.ports[way.key]}{path}"

    def _wrk(
        self, way: Way, connections: int, seconds: int, headers: Sequence[str] = ()
    ) -> _Measured:
        """wrk on ``GET /1k``: req/s, and CPU in µs per request."""
        url = self._url(way, SMALL_PATH)
        result = run_wrk(self.wrk, url, connections, 1, seconds, REPO_ROOT, headers)
        if result.errors:
            raise BenchError(f"wrk through {way.key} counted {result.errors} errors")
        return _Measured(result.requests_per_s, result.requests, 1e6)

    def _s_time(self, way: Way, seconds: int) -> _Measured:
        """``openssl s_time -new``: connections per second, and CPU in µs per connection.

        Raises:
            BenchError: s_time failed, or its connections read on average
                other than the whole answer.
        """
        args = s_time_args(self.openssl, self.ports[way.key], seconds)
        started = time.monotonic()
        code, stdout, stderr = run_bounded("openssl s_time", args, S_TIME_TIMEOUT_S, REPO_ROOT)
        wall_s = time.monotonic() - started
        if code != 0:
            raise BenchError(f"openssl s_time through {way.key} exited with status {code}: "
                             f"{stderr.strip()[-400:]}")  # fmt: skip
        result = parse_s_time(stdout)
        expected = self.answer_bytes[way.key]
        if result.bytes_per_connection != expected:
            raise BenchError(
                f"openssl s_time through {way.key} read {result.bytes_per_connection} bytes "
                f"per connection, where one answer is {expected}"
            )
        return _Measured(result.connections / wall_s, result.connections, 1e6)

    def _download(self, way: Way) -> _Measured:
        """curl on the 100 MiB file: MiB/s, and CPU seconds per GiB."""
        port = self.ports[way.key]
        cacert = self.certificate.cert_path if way.scheme == HTTPS else None
        done = download(self.curl, port, LARGE_PATH, LARGE_BYTES, self.workdir, cacert=cacert)
        return _Measured(done.mib_per_s, done.bytes / GIB, 1.0)


@dataclass(frozen=True)
class _TlsProbe:
    version: str
    cipher: str
    resumed: bool
    answer_bytes: int  # the whole answer to GET /1k HTTP/1.0, head and body


def _probe_tls(port: int, context: ssl.SSLContext) -> _TlsProbe:
    """Two connections to ``port``: the second offers the first's session.

    The first asks what s_time asks (``GET /1k HTTP/1.0``, no Host) and
    reads the answer to its end, which also brings the server's TLS 1.3
    session tickets.

    Raises:
        BenchError: a connection failed or the answer was not a 200 with 1 KiB.
    """
    try:
        with (
            socket.create_connection((LOOPBACK, port), PROBE_TIMEOUT_S) as raw,
            context.wrap_socket(raw, server_hostname=LOOPBACK) as first,
        ):
            version, cipher = first.version(), first.cipher()
            first.sendall(_HTTP_1_0_REQUEST)
            answer = _read_to_end(first)  # the TLS 1.3 session tickets come with it
            session = first.session
        with (
            socket.create_connection((LOOPBACK, port), PROBE_TIMEOUT_S) as raw,
            context.wrap_socket(raw, server_hostname=LOOPBACK, session=session) as second,
        ):
            second.sendall(_HTTP_1_0_REQUEST)
            _read_to_end(second)
            resumed = bool(second.session_reused)
    except OSError as exc:
        raise BenchError(f"TLS to {LOOPBACK}:{port} failed: {exc}") from None
    head, _, body = answer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 ") or len(body) != SMALL_BYTES:
        status_line = head.split(b"\r\n", 1)[0]
        raise BenchError(
            f"GET {SMALL_PATH} HTTP/1.0 over TLS to port {port} answered "
            f"{status_line!r} with {len(body)} body bytes"
        )
    if version is None or cipher is None:
        raise BenchError(f"TLS to {LOOPBACK}:{port} reported no protocol or cipher")
    return _TlsProbe(version, cipher[0], resumed, len(answer))


def _read_to_end(sock: ssl.SSLSocket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


if __name__ == "__main__":
    sys.exit(main())
