"""wrk: GETs at a fixed number of connections, and its text report parsed.

Connections are kept alive unless the request carries ``Connection: close``:
then the server closes each connection after its answer and wrk opens a new
one for the next request, which measures the cost of a new connection.

wrk prints durations with a unit (``us``, ``ms``, ``s``, ``m``, ``h``), byte
counts with a binary one (``B``, ``KB``, ``MB``, ...) and omits the error lines
when they would read zero. The parser accepts all of that and fails loudly,
quoting wrk's output, when a figure it needs is missing.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.errors import BenchError
from bench.interpreter import SYSTEM_PYTHON
from bench.processes import run_bounded

# A request slower than this counts as a timeout error (wrk's default is 2 s,
# too short for 100 connections through a busy tunnel on 2 cores).
REQUEST_TIMEOUT_S: Final = 5
#: the on-demand comparisons' defaults (:func:`load_arguments`)
LOAD_CONCURRENCY: Final = (1, 100)
LOAD_DURATION_S: Final = 5
# wrk ends on its own after its duration; this bounds the wait if it does not.
EXTRA_WAIT_S: Final = 30.0

# Seconds per unit as (multiplier, divisor): dividing keeps 100.00us exactly 0.0001.
_TIME_UNITS: Final = {"us": (1, 1e6), "ms": (1, 1e3), "s": (1, 1), "m": (60, 1), "h": (3600, 1)}
_BYTE_UNITS: Final = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_NUMBER: Final = r"(\d+(?:\.\d+)?)"
_TIME: Final = _NUMBER + r"(us|ms|s|m|h)"
_PERCENTILE: Final = re.compile(rf"^\s*{_NUMBER}%\s+{_TIME}\s*$", re.MULTILINE)
_LATENCY: Final = re.compile(rf"^\s*Latency\s+{_TIME}\s+\S+\s+{_TIME}", re.MULTILINE)
_TOTALS: Final = re.compile(
    rf"^\s*(\d+) requests in {_TIME}, {_NUMBER}([KMGT]?B) read", re.MULTILINE
)
_SOCKET_ERRORS: Final = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)
_NON_2XX_3XX: Final = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_REQUESTS_PER_S: Final = re.compile(rf"^Requests/sec:\s+{_NUMBER}", re.MULTILINE)


@dataclass(frozen=True)
class WrkResult:
    """One wrk run's figures, in SI units (seconds, bytes)."""

    requests: int
    duration_s: float
    requests_per_s: float
    bytes_read: int
    latency_avg_s: float | None
    latency_max_s: float | None
    latency_p50_s: float
    latency_p75_s: float | None
    latency_p90_s: float | None
    latency_p99_s: float
    non_2xx_3xx: int
    connect_errors: int
    read_errors: int
    write_errors: int
    timeouts: int

    @property
    def errors(self) -> int:
        """Every failed request or connection wrk counted."""
        return (
            self.non_2xx_3xx
            + self.connect_errors
            + self.read_errors
            + self.write_errors
            + self.timeouts
        )


def seconds(value: str, unit: str) -> float:
    """``1.5``, ``ms`` -> 0.0015."""
    multiplier, divisor = _TIME_UNITS[unit]
    return float(value) * multiplier / divisor


def parse_wrk(output: str) -> WrkResult:
    """Read the figures out of wrk's report (run with ``--latency``).

    Raises:
        BenchError: the request totals, Requests/sec or the 50% and 99%
            latencies are missing.
    """
    totals = _TOTALS.search(output)
    rate = _REQUESTS_PER_S.search(output)
    percentiles = {
        float(match[1]): seconds(match[2], match[3]) for match in _PERCENTILE.finditer(output)
    }
    if totals is None or rate is None or 50.0 not in percentiles or 99.0 not in percentiles:
        raise BenchError(f"cannot read wrk's report:\n{output.strip()}")
    latency = _LATENCY.search(output)
    socket_errors = _SOCKET_ERRORS.search(output)
    connect, read, write, timeout = (
        (int(group) for group in socket_errors.groups()) if socket_errors else (0, 0, 0, 0)
    )
    non_2xx_3xx = _NON_2XX_3XX.search(output)
    return WrkResult(
        requests=int(totals[1]),
        duration_s=seconds(totals[2], totals[3]),
        requests_per_s=float(rate[1]),
        bytes_read=round(float(totals[4]) * _BYTE_UNITS[totals[5]]),
        latency_avg_s=seconds(latency[1], latency[2]) if latency else None,
        latency_max_s=seconds(latency[3], latency[4]) if latency else None,
        latency_p50_s=percentiles[50.0],
        latency_p75_s=percentiles.get(75.0),
        latency_p90_s=percentiles.get(90.0),
        latency_p99_s=percentiles[99.0],
        non_2xx_3xx=int(non_2xx_3xx[1]) if non_2xx_3xx else 0,
        connect_errors=connect,
        read_errors=read,
        write_errors=write,
        timeouts=timeout,
    )


def wrk_threads(connections: int, max_threads: int) -> int:
    """wrk's thread count: ``max_threads``, but never more threads than connections."""
    return max(1, min(connections, max_threads))


def run_wrk(
    wrk: Path,
    url: str,
    connections: int,
    threads: int,
    duration_s: int,
    cwd: Path,
    headers: Sequence[str] = (),
) -> WrkResult:
    """Load ``url`` with ``connections`` connections for ``duration_s``; parse the report.

    ``headers`` (``"Connection: close"``) are added to every request.

    Raises:
        BenchError: wrk failed, ran far past its duration, or printed no report.
    """
    args = [
        str(wrk),
        f"--threads={threads}",
        f"--connections={connections}",
        f"--duration={duration_s}s",
        f"--timeout={REQUEST_TIMEOUT_S}s",
        "--latency",
        *(f"--header={header}" for header in headers),
        url,
    ]
    code, stdout, stderr = run_bounded("wrk", args, duration_s + EXTRA_WAIT_S, cwd)
    if code != 0:
        raise BenchError(f"wrk exited with status {code}: {(stderr or stdout).strip()}")
    return parse_wrk(stdout)


def load_arguments(
    prog: str, description: str, *, runs: str, default_rounds: int
) -> argparse.ArgumentParser:
    """The command line of an on-demand wrk comparison (bench.floor, bench.tcp_port).

    ``--concurrency`` (repeatable), ``--duration``, ``--rounds`` and
    ``--python``, the interpreter that runs ``runs``; read them with
    :func:`parse_load_arguments`.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--concurrency",
        type=int,
        action="append",
        metavar="N",
        help="keep-alive connections, repeatable (default 1 100)",
    )
    parser.add_argument(
        "--duration",
        type=int,
        default=LOAD_DURATION_S,
        metavar="SECONDS",
        help=f"length of each wrk measurement (default {LOAD_DURATION_S})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=default_rounds,
        metavar="N",
        help=f"measurements of each target at each concurrency (default {default_rounds})",
    )
    parser.add_argument(
        "--python",
        type=Path,
        metavar="PATH",
        help=f"the Python to run {runs} on (default: {SYSTEM_PYTHON} when it is 3.11 "
        "or newer, as make bench runs them; else this one)",
    )
    return parser


def parse_load_arguments(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace:
    """Parse :func:`load_arguments`' command line, with ``--concurrency`` 1 and 100 by default."""
    args = parser.parse_args(argv)
    if args.concurrency is None:
        args.concurrency = list(LOAD_CONCURRENCY)
    if min(args.concurrency) < 1 or args.duration < 1 or args.rounds < 1:
        parser.error("--concurrency, --duration and --rounds must be at least 1")
    return args
