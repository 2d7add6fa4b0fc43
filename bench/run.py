"""``python -m bench``: measure the same nginx directly and through a real tunnel, in one run.

Theory of operation. One nginx serves ``/1k`` and ``/100m`` from a temp
directory. A real exit server and client (``homeport server`` and ``homeport
client`` subprocesses) put it behind a tunnel on 127.0.0.1. For each
concurrency wrk loads ``/1k`` directly, then through the tunnel, each after an
unmeasured warm-up. curl then downloads ``/100m`` a few times each way. The
exit server runs with its access log off; a last run at c=100, through a fresh
tunnel whose exit server logs every request, gives the log's cost. Every
process is ended by its PID in ``finally`` blocks, Ctrl-C and SIGTERM included,
and the temp directory goes with them.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Final

from bench.errors import BenchError
from bench.machine import (
    IDLE_CHECK_S,
    cpu_busy_percent,
    machine_info,
    read_nginx_build,
    software_versions,
)
from bench.measure import (
    Plan,
    measure_access_log,
    measure_downloads,
    measure_http,
    progress,
)
from bench.report import Report, format_table, to_json, write_results
from bench.tools import ensure_tools
from bench.tunnel import REPO_ROOT, run_tunnel
from bench.upstream import LARGE_PATH, SMALL_PATH, run_nginx, write_site

RESULTS_DIR: Final = Path(__file__).resolve().parent / "results"
DEFAULT_DURATION_S: Final = 10
DEFAULT_WARMUP_S: Final = 2
DEFAULT_DOWNLOADS: Final = 3
QUICK_DURATION_S: Final = 3
QUICK_WARMUP_S: Final = 1
QUICK_DOWNLOADS: Final = 1
CONCURRENCIES: Final = (1, 10, 100)
ACCESS_LOG_CONNECTIONS: Final = 100
# One wrk thread: on 2 cores shared by wrk, nginx, the exit server and the
# client, a second load thread would only take CPU from what is measured.
DEFAULT_WRK_THREADS: Final = 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table and write the JSON; return the exit status."""
    args = parse_args(argv)
    plan = make_plan(args)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = run(plan)
        print(format_table(report))
        written = write_results(to_json(report), args.results_dir)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130
    print(f"\nwrote {', '.join(str(path) for path in written)}")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line: ``--duration``, ``--quick`` and a few knobs."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark homeport: the same nginx, directly and through a real tunnel.",
    )
    parser.add_argument(
        "--duration",
        type=_positive_int,
        metavar="SECONDS",
        help=f"length of each measurement (default {DEFAULT_DURATION_S}; "
        f"{QUICK_DURATION_S} with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of under a minute: short runs, one download each way",
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
        help=f"connections for GET {SMALL_PATH}, repeatable "
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
        "--downloads",
        type=_positive_int,
        metavar="N",
        help=f"downloads of {LARGE_PATH} each way (default {DEFAULT_DOWNLOADS}; "
        f"{QUICK_DOWNLOADS} with --quick)",
    )
    parser.add_argument(
        "--no-access-log-run",
        action="store_true",
        help=f"skip the c={ACCESS_LOG_CONNECTIONS} run with the exit server's access log on",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        metavar="DIR",
        help="where latest.json and its timestamped copy go (default bench/results)",
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
        concurrencies=tuple(args.concurrency or CONCURRENCIES),
        max_wrk_threads=args.wrk_threads,
        downloads=args.downloads or (QUICK_DOWNLOADS if quick else DEFAULT_DOWNLOADS),
        access_log_connections=None if args.no_access_log_run else ACCESS_LOG_CONNECTIONS,
        quick=quick,
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
    nginx_build = read_nginx_build(tools.nginx, REPO_ROOT)
    started_at = time.time()
    machine = machine_info()
    software = software_versions(tools, nginx_build, REPO_ROOT)
    with tempfile.TemporaryDirectory(prefix="homeport-bench-") as temp:
        workdir = Path(temp)
        progress(f"writing {SMALL_PATH} and {LARGE_PATH} under {workdir}")
        small_body = write_site(workdir)
        with run_nginx(tools.nginx, workdir, nginx_build, small_body) as upstream:
            progress(f"nginx serving on {upstream.url}")
            with run_tunnel(workdir, upstream.url, small_body, access_log=False) as tunnel:
                progress(f"tunnel up: visitors on port {tunnel.visitor_port}")
                http = [
                    measure_http(plan, tools, upstream, tunnel, connections)
                    for connections in plan.concurrencies
                ]
                downloads = measure_downloads(plan, tools, upstream.port, tunnel)
                status_after = tunnel.wait_idle()
                peak_rss = {
                    "server": tunnel.server.peak_rss_bytes(),
                    "client": tunnel.client.peak_rss_bytes(),
                }
            access_log = None
            if plan.access_log_connections is not None:
                with run_tunnel(workdir, upstream.url, small_body, access_log=True) as logged:
                    access_log = measure_access_log(
                        plan, tools, upstream, logged, plan.access_log_connections
                    )
    # Everything of ours has stopped: is something else running now?
    busy_after = cpu_busy_percent(IDLE_CHECK_S)
    return Report(
        started_at=started_at,
        plan=plan,
        machine={**machine, "cpu_busy_percent_after": busy_after},
        software=software,
        http=http,
        access_log=access_log,
        downloads=downloads,
        tunnel_status_after=status_after,
        peak_rss_bytes=peak_rss,
    )
