"""``python -m bench``: one nginx directly, through homeport, ``ssh -R`` and the peers, in one run.

Theory of operation. One nginx serves ``/1k`` and ``/100m`` and takes uploads
on ``/upload``, from a temp directory; an idle upstream holds SSE streams open.
A real exit server and client (``homeport server`` and ``homeport client``
subprocesses), and our own sshd with an ``ssh -N -R`` client, put both behind
a tunnel on 127.0.0.1, and so do the peers, pipenet (Node.js) and PageKite
(Python), the other self-hosted tunnels that run here (bench/peers.py). The
steps, each through every target in turn (direct, homeport, ssh -R, the
peers): wrk loads ``/1k`` at each concurrency, kept alive, and at c=10 with a
new connection per request, each run after an unmeasured warm-up; curl
downloads ``/100m`` and uploads 100 MiB a few times. A second homeport
tunnel, its control channel over TLS (``wss://``, as deployed), takes its
turn at c=100 and in the transfers: what the encryption costs. The RSS of each
tunnel's two sides is read once it is up (idle) and at its peak during the
c=100 run. A fresh homeport tunnel, with the exit server's access log on, gives
the log's cost at c=100. Last, fresh homeport and ``ssh -R`` tunnels carry
1,000 and then 10,000 idle SSE visitors, for the memory each open stream
costs (the peers are left out there: pipenet carries ten requests at a time).
Every process is ended by its PID in ``finally`` blocks, Ctrl-C and SIGTERM
included, and the temp directory goes with them.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Final

from bench.errors import BenchError
from bench.floor import run_relays
from bench.idle_upstream import IdleUpstream, run_idle_upstream
from bench.interpreter import SYSTEM_PYTHON, tunnel_python
from bench.machine import (
    IDLE_CHECK_S,
    cpu_busy_percent,
    machine_info,
    read_nginx_build,
    software_versions,
)
from bench.measure import (
    DOWNLOAD,
    NEW_CONNECTION,
    UPLOAD,
    AccessLogPoint,
    Dropouts,
    HttpPoint,
    Plan,
    Transfers,
    measure_access_log,
    measure_http,
    measure_transfers,
    progress,
)
from bench.peers import (
    PAGEKITE,
    PIPENET,
    PIPENET_VERSION,
    PeerTunnel,
    ensure_pipenet,
    peer_versions,
    run_pagekite,
    run_pipenet,
)
from bench.processes import raise_open_files_limit
from bench.report import BUSY_CPU_PERCENT, Report, format_table, to_json, write_results
from bench.ssh_tunnel import SshTunnel, run_ssh_tunnel
from bench.streams import IDLE_HOST, StreamsResult, measure_streams
from bench.targets import (
    HOMEPORT,
    HOMEPORT_WSS,
    RELAYS,
    SSH_R,
    Target,
    direct_target,
    homeport_target,
    peer_target,
    ssh_target,
)
from bench.tools import PeerToolPaths, ToolPaths, ensure_peer_tools, ensure_tools
from bench.tunnel import REPO_ROOT, Build, Tunnel, compile_bytecode, compiled_tree, run_tunnel
from bench.upstream import LARGE_PATH, SMALL_PATH, Upstream, run_nginx, write_site

RESULTS_DIR: Final = Path(__file__).resolve().parent / "results"
#: where npm installs pipenet, kept between runs (build/ is not committed)
PEERS_DIR: Final = REPO_ROOT / "build" / "bench-peers"
DEFAULT_DURATION_S: Final = 5
DEFAULT_WARMUP_S: Final = 2
# Three rounds of 5 s, the targets taking turns, rather than one run of 10 s each:
# the median round does not move with one bad stretch of the VM (bench/measure.py).
DEFAULT_ROUNDS: Final = 3
DEFAULT_TRANSFERS: Final = 3
QUICK_DURATION_S: Final = 3
QUICK_WARMUP_S: Final = 1
QUICK_ROUNDS: Final = 1
QUICK_TRANSFERS: Final = 1
CONCURRENCIES: Final = (1, 10, 100)
NEW_CONNECTION_CONNECTIONS: Final = 10
ACCESS_LOG_CONNECTIONS: Final = 100
WSS_CONNECTIONS: Final = 100
STREAM_COUNTS: Final = (1_000, 10_000)
QUICK_STREAM_COUNTS: Final = (200, 1_000)
# Sockets each process may need beyond one per stream (listeners, logs, wrk's 100).
SPARE_OPEN_FILES: Final = 4096
# One wrk thread: on 2 cores shared by wrk, nginx, the exit server and the
# client, a second load thread would only take CPU from what is measured.
DEFAULT_WRK_THREADS: Final = 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON and the chart; return the exit status."""
    args = parse_args(argv)
    plan = make_plan(args)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = run(plan)
        print(format_table(report))
        written = write_results(to_json(report), args.results_dir)
        written += _chart(report, args.results_dir)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130
    print(f"\nwrote {', '.join(str(path) for path in written)}")
    if report.interfered():
        print(
            "bench: WARNING: other load on the machine during the run; see WARNINGS above",
            file=sys.stderr,
        )
    return 0


def _chart(report: Report, results_dir: Path) -> list[Path]:
    """The PNG chart; a missing matplotlib costs the chart only, with a warning."""
    from bench.chart import write_chart  # imports matplotlib's modules, which take a while

    try:
        return write_chart(report, results_dir)
    except BenchError as exc:
        print(f"bench: warning: {exc}", file=sys.stderr)
        return []


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line: ``--duration``, ``--quick`` and a few knobs."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark homeport: the same nginx, directly, through a real homeport "
        "tunnel and through ssh -R.",
    )
    parser.add_argument(
        "--duration",
        type=_positive_int,
        metavar="SECONDS",
        help=f"length of each wrk round (default {DEFAULT_DURATION_S}; "
        f"{QUICK_DURATION_S} with --quick)",
    )
    parser.add_argument(
        "--rounds",
        type=_positive_int,
        metavar="N",
        help="wrk rounds per test, the targets taking turns; each target's median round "
        f"by req/s is reported (default {DEFAULT_ROUNDS}; {QUICK_ROUNDS} with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of about two minutes: short runs, one transfer each way, "
        f"{' and '.join(map(str, QUICK_STREAM_COUNTS))} idle streams",
    )
    parser.add_argument(
        "--warmup",
        type=_positive_int,
        metavar="SECONDS",
        help=f"unmeasured load before each measurement (default {DEFAULT_WARMUP_S}; "
        f"{QUICK_WARMUP_S} with --quick)",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        action="append",
        metavar="N",
        help=f"keep-alive connections for GET {SMALL_PATH}, repeatable "
        f"(default {' '.join(map(str, CONCURRENCIES))})",
    )
    parser.add_argument(
        "--wrk-threads",
        type=_positive_int,
        default=DEFAULT_WRK_THREADS,
        metavar="N",
        help=f"wrk threads at most (default {DEFAULT_WRK_THREADS})",
    )
    parser.add_argument(
        "--transfers",
        "--downloads",
        type=_positive_int,
        metavar="N",
        help=f"downloads of {LARGE_PATH} and 100 MiB uploads through each target "
        f"(default {DEFAULT_TRANSFERS}; {QUICK_TRANSFERS} with --quick)",
    )
    parser.add_argument(
        "--streams",
        type=_positive_int,
        action="append",
        metavar="N",
        help="idle open streams to measure memory at, repeatable "
        f"(default {' '.join(map(str, STREAM_COUNTS))})",
    )
    parser.add_argument(
        "--no-ssh", action="store_true", help="skip the ssh -R column (no sshd is started)"
    )
    parser.add_argument(
        "--no-floor",
        action="store_true",
        help="skip the two bare relays, what the hops alone allow (bench.floor)",
    )
    parser.add_argument(
        "--no-peers",
        action="store_true",
        help="skip the pipenet and PageKite columns (nothing installed from npm)",
    )
    parser.add_argument(
        "--pure",
        action="store_true",
        help="run the exit server pure Python, as HOMEPORT_COMPILE=0 installs it "
        "(default: compiled, as the exit node installs it)",
    )
    parser.add_argument(
        "--python",
        type=Path,
        metavar="PATH",
        help="the Python to run the tunnel and the relays on (default: the system's "
        f"{SYSTEM_PYTHON} when it is 3.11 or newer, as the exit node and the Pi run homeport; "
        "else this one)",
    )
    parser.add_argument(
        "--no-access-log-run",
        action="store_true",
        help=f"skip the c={ACCESS_LOG_CONNECTIONS} run with the exit server's access log on",
    )
    parser.add_argument(
        "--no-wss",
        action="store_true",
        help=f"leave out the tunnel over wss:// (TLS) at c={WSS_CONNECTIONS} and in the transfers",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        metavar="DIR",
        help="where latest.json, latest.png and their timestamped copies go "
        "(default bench/results)",
    )
    return parser.parse_args(argv)


def _positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not at least 1")
    return value


def make_plan(args: argparse.Namespace) -> Plan:
    """The plan from the command line: the normal run, or ``--quick``'s shorter one."""
    quick: bool = args.quick
    return Plan(
        duration_s=args.duration or (QUICK_DURATION_S if quick else DEFAULT_DURATION_S),
        warmup_s=args.warmup or (QUICK_WARMUP_S if quick else DEFAULT_WARMUP_S),
        rounds=args.rounds or (QUICK_ROUNDS if quick else DEFAULT_ROUNDS),
        concurrencies=tuple(args.concurrency or CONCURRENCIES),
        max_wrk_threads=args.wrk_threads,
        new_connection_connections=NEW_CONNECTION_CONNECTIONS,
        transfers=args.transfers or (QUICK_TRANSFERS if quick else DEFAULT_TRANSFERS),
        access_log_connections=None if args.no_access_log_run else ACCESS_LOG_CONNECTIONS,
        stream_counts=tuple(
            sorted(set(args.streams or (QUICK_STREAM_COUNTS if quick else STREAM_COUNTS)))
        ),
        ssh=not args.no_ssh,
        peers=not args.no_peers,
        floor=not args.no_floor,
        quick=quick,
        compiled=not args.pure,
        python=args.python,
        wss_connections=None if args.no_wss else WSS_CONNECTIONS,
    )


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM: leave through the ``finally`` blocks, as Ctrl-C does."""
    raise KeyboardInterrupt(f"signal {signum}")


def run(plan: Plan) -> Report:
    """Install what is missing, start everything, measure, and stop everything.

    Raises:
        BenchError: a tool, a process or a measurement failed.
    """
    tools = ensure_tools()
    dropouts = Dropouts()
    peers = _prepare_peers(dropouts) if plan.peers else None
    compile_bytecode()
    python = tunnel_python(plan.python)
    progress(f"the tunnel and the relays run on {python.description}")
    build = Build(python.executable)
    if plan.compiled:
        progress("building the exit server's compiled modules (HOMEPORT_COMPILE=1)")
        build = Build(python.executable, compiled_tree(python))
        compile_bytecode(build.server_tree)
    # Every child inherits it: each holds a socket per idle stream.
    raise_open_files_limit(max(plan.stream_counts) + SPARE_OPEN_FILES)
    nginx_build = read_nginx_build(tools.nginx, REPO_ROOT)
    started_at = time.time()
    machine = machine_info()
    busy = machine.get("cpu_busy_percent_before")
    if busy is not None and busy > BUSY_CPU_PERCENT:
        progress(
            f"WARNING: the CPUs are {busy:.0f}% busy before the run: figures will be low; "
            "better re-run on a quiet machine"
        )
    software = software_versions(tools, nginx_build, REPO_ROOT)
    software["exit_server_build"] = "compiled" if plan.compiled else "pure Python"
    software["tunnel_python"] = python.description
    if peers is not None:
        software.update(peer_versions(peers.tools, REPO_ROOT))
    with tempfile.TemporaryDirectory(prefix="homeport-bench-") as temp:
        workdir = Path(temp)
        progress(f"writing {SMALL_PATH} and {LARGE_PATH} under {workdir}")
        small_body = write_site(workdir)
        with (
            run_nginx(tools.nginx, workdir, nginx_build, small_body) as upstream,
            run_idle_upstream(workdir, REPO_ROOT) as idle,
        ):
            progress(f"nginx serving on {upstream.url}, the idle upstream on {idle.url}")
            measured = _measure_throughput(
                plan, tools, peers, dropouts, workdir, upstream, idle, build
            )
            access_log: AccessLogPoint | None = None
            if plan.access_log_connections is not None:
                with run_tunnel(
                    workdir,
                    upstream.url,
                    small_body,
                    label="access-log",
                    access_log=True,
                    build=build,
                ) as logged:
                    access_log = measure_access_log(
                        plan,
                        tools,
                        homeport_target(upstream, logged),
                        plan.access_log_connections,
                    )
            streams = _measure_streams(plan, tools, workdir, upstream, idle, build)
    # Everything of ours has stopped: is something else running now?
    busy_after = cpu_busy_percent(IDLE_CHECK_S)
    return Report(
        started_at=started_at,
        plan=plan,
        machine={**machine, "cpu_busy_percent_after": busy_after},
        software=software,
        targets=measured.targets,
        http=measured.http,
        new_connection=measured.new_connection,
        access_log=access_log,
        downloads=measured.downloads,
        uploads=measured.uploads,
        idle_rss_bytes=measured.idle_rss_bytes,
        streams=streams,
        tunnel_status_after=measured.tunnel_status_after,
        dropped=measured.dropped,
    )


@dataclass(frozen=True)
class _Peers:
    """What the peers need: Node.js, npm and PageKite, and pipenet's entry point if installed."""

    tools: PeerToolPaths
    pipenet: Path | None


def _prepare_peers(dropouts: Dropouts) -> _Peers | None:
    """Install the peers' programs where missing: Debian's packages, then pipenet from npm.

    A peer that cannot be installed leaves the run (``dropouts``); the rest goes on.
    """
    try:
        tools = ensure_peer_tools()
    except BenchError as error:
        for key in (PIPENET, PAGEKITE):
            dropouts.leave(key, "installing", error)
        return None
    progress(f"pipenet {PIPENET_VERSION} from npm under {PEERS_DIR}")
    try:
        pipenet: Path | None = ensure_pipenet(tools, PEERS_DIR)
    except BenchError as error:
        dropouts.leave(PIPENET, "installing", error)
        pipenet = None
    return _Peers(tools, pipenet)


@dataclass(frozen=True)
class _Throughput:
    """What was measured with direct, homeport and ssh -R all up."""

    targets: tuple[str, ...]
    http: list[HttpPoint]
    new_connection: HttpPoint
    downloads: Transfers
    uploads: Transfers
    idle_rss_bytes: dict[str, dict[str, int | None]]
    tunnel_status_after: dict[str, Any]
    dropped: dict[str, str]  # peer -> where and why it failed


def _peers(
    peers: _Peers | None, workdir: Path, upstream: Upstream
) -> list[tuple[str, contextlib.AbstractContextManager[PeerTunnel]]]:
    """Each installed peer's key and the context that runs it in front of ``upstream``."""
    if peers is None:
        return []
    started = []
    if peers.pipenet is not None:
        pipenet = run_pipenet(
            peers.tools, peers.pipenet, workdir, upstream.port, upstream.small_body
        )
        started.append((PIPENET, pipenet))
    pagekite = run_pagekite(peers.tools, workdir, upstream.port, upstream.small_body)
    return [*started, (PAGEKITE, pagekite)]


def _measure_throughput(
    plan: Plan,
    tools: ToolPaths,
    peers: _Peers | None,
    dropouts: Dropouts,
    workdir: Path,
    upstream: Upstream,
    idle: IdleUpstream,
    build: Build,
) -> _Throughput:
    """Everything measured with every target up: wrk, transfers, RSS idle and at c=100.

    The tunnel over wss joins the others at ``plan.wss_connections`` only, and
    in the transfers.
    """
    with contextlib.ExitStack() as stack:
        tunnel: Tunnel = stack.enter_context(
            run_tunnel(
                workdir,
                upstream.url,
                upstream.small_body,
                label="main",
                routes=[(IDLE_HOST, idle.url)],
                build=build,
            )
        )
        progress(f"homeport up: visitors on port {tunnel.visitor_port}")
        targets = [direct_target(upstream), homeport_target(upstream, tunnel)]
        if plan.ssh:
            ssh: SshTunnel = stack.enter_context(
                run_ssh_tunnel(tools, workdir, [upstream.url], upstream.small_body, label="main")
            )
            targets.append(ssh_target(upstream, ssh))
            progress(f"ssh -R up: visitors on port {targets[-1].port}")
        for key, peer in _peers(peers, workdir, upstream):
            try:
                targets.append(peer_target(upstream, stack.enter_context(peer)))
            except BenchError as error:
                dropouts.leave(key, "starting", error)
                continue
            progress(f"{targets[-1].label} up: visitors on port {targets[-1].port}")
        if plan.floor:
            try:
                relays = stack.enter_context(
                    run_relays(workdir, upstream.port, upstream.small_body, build.python)
                )
            except BenchError as error:
                dropouts.leave(RELAYS, "starting", error)
            else:
                targets.append(peer_target(upstream, relays))
                progress(f"two bare relays (the floor) up: visitors on port {relays.port}")
        wss: list[Target] = []
        if plan.wss_connections is not None:
            over_tls: Tunnel = stack.enter_context(
                run_tunnel(
                    workdir,
                    upstream.url,
                    upstream.small_body,
                    label="wss",
                    build=build,
                    tls=True,
                )
            )
            wss.append(homeport_target(upstream, over_tls, HOMEPORT_WSS))
            progress(f"homeport over wss up: visitors on port {over_tls.visitor_port}")
        # Connected, and one GET /1k through each: before any load.
        idle_rss = {
            target.key: {name: side.tree_rss_bytes() for name, side in target.sides.items()}
            for target in [*targets, *wss]
            if target.sides
        }
        http = [
            measure_http(
                plan,
                tools,
                [*targets, *wss] if connections == plan.wss_connections else targets,
                connections,
                dropouts=dropouts,
            )
            for connections in plan.concurrencies
        ]
        new_connection = measure_http(
            plan, tools, targets, plan.new_connection_connections, NEW_CONNECTION, dropouts
        )
        downloads = measure_transfers(plan, tools, [*targets, *wss], upstream, DOWNLOAD, dropouts)
        uploads = measure_transfers(plan, tools, [*targets, *wss], upstream, UPLOAD, dropouts)
        status_after = tunnel.wait_idle()
    return _Throughput(
        targets=tuple(target.key for target in [*targets, *wss]),
        http=http,
        new_connection=new_connection,
        downloads=downloads,
        uploads=uploads,
        idle_rss_bytes=idle_rss,
        tunnel_status_after=status_after,
        dropped=dropouts.reasons,
    )


def _measure_streams(
    plan: Plan,
    tools: ToolPaths,
    workdir: Path,
    upstream: Upstream,
    idle: IdleUpstream,
    build: Build,
) -> dict[str, StreamsResult]:
    """Idle streams through a fresh homeport tunnel, then through a fresh ``ssh -R``."""
    results = {}
    most = max(plan.stream_counts)
    with run_tunnel(
        workdir,
        upstream.url,
        upstream.small_body,
        label="streams",
        routes=[(IDLE_HOST, idle.url)],
        max_streams=most + SPARE_OPEN_FILES,
        build=build,
    ) as tunnel:
        progress(f"idle streams through homeport: {', '.join(map(str, plan.stream_counts))}")
        results[HOMEPORT] = measure_streams(
            HOMEPORT,
            tunnel.visitor_port,
            plan.stream_counts,
            {"server": tunnel.server, "client": tunnel.client},
            idle,
            tunnel.status,
        )
    if plan.ssh:
        with run_ssh_tunnel(
            tools, workdir, [upstream.url, idle.url], upstream.small_body, label="streams"
        ) as ssh:
            progress(f"idle streams through ssh -R: {', '.join(map(str, plan.stream_counts))}")
            results[SSH_R] = measure_streams(
                SSH_R,
                ssh.port_for(idle.url),
                plan.stream_counts,
                {"server": ssh.sshd, "client": ssh.ssh},
                idle,
                None,
            )
    return results
