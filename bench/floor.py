"""``python -m bench.floor``: what two bare relays in Python reach, against direct nginx.

It starts the benchmark's nginx and two ``bench.relay`` processes chained in
front of it (wrk → relay → relay → nginx: the shape of a tunnel, an exit
side and a client side), and measures ``GET /1k`` with wrk directly and
through the relays, taking turns, at each concurrency. The relays do nothing
but copy bytes on uvloop, so the ratio is what the two hops alone allow
and the CPU they spend per request is what the hops alone cost:
docs/performance.md reads homeport's figures against it. It is a
yardstick, not a ceiling: a tunnel that multiplexes passes it where its
batching saves per-connection work.

Every process is ended by its PID on the way out, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from bench.errors import run_command
from bench.interpreter import tunnel_python
from bench.machine import read_nginx_build
from bench.measure import progress
from bench.peers import PeerTunnel
from bench.processes import LOOPBACK, Child, free_port, running, wait_until
from bench.targets import RELAYS
from bench.tools import ensure_tools
from bench.tunnel import REPO_ROOT
from bench.upstream import READY_TIMEOUT_S, SMALL_PATH, run_nginx, serves, write_site
from bench.wrk import WrkResult, load_arguments, parse_load_arguments, run_wrk

DEFAULT_ROUNDS: Final = 2
WARMUP_S: Final = 1


def main(argv: Sequence[str] | None = None) -> int:
    """Measure direct nginx and two relays in front of it; print a table; return the status."""
    args = parse_args(argv)
    status, _ = run_command("bench.floor", lambda: measure(args))
    return status


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = load_arguments(
        "python -m bench.floor",
        "Two bare uvloop relays in front of nginx, against nginx directly.",
        runs="the relays",
        default_rounds=DEFAULT_ROUNDS,
    )
    return parse_load_arguments(parser, argv)


def measure(args: argparse.Namespace) -> None:
    """Start nginx and the relays, and print one row per measurement.

    Raises:
        BenchError: a tool or a process failed, or the relays did not serve.
    """
    tools = ensure_tools()
    nginx_build = read_nginx_build(tools.nginx, REPO_ROOT)
    python = tunnel_python(args.python)
    print(f"the relays run on {python.description}")
    with tempfile.TemporaryDirectory(prefix="homeport-floor-") as temp:
        workdir = Path(temp)
        small_body = write_site(workdir)
        with (
            run_nginx(tools.nginx, workdir, nginx_build, small_body) as upstream,
            run_relays(workdir, upstream.port, small_body, python.executable) as relays,
        ):
            exit_side, client_side = relays.server, relays.client
            print(
                f"{'c':>4} {'direct req/s':>13} {'relays req/s':>13} {'ratio':>6} "
                f"{'p99 ratio':>9}  CPU us/req: exit side, client side"
            )
            for connections in args.concurrency:
                for _ in range(args.rounds):
                    direct = _wrk(tools.wrk, upstream.port, connections, args.duration)
                    before = exit_side.cpu_seconds(), client_side.cpu_seconds()
                    relayed = _wrk(tools.wrk, relays.port, connections, args.duration)
                    after = exit_side.cpu_seconds(), client_side.cpu_seconds()
                    per_request = [
                        1e6 * (end - start) / max(relayed.requests, 1)
                        for start, end in zip(before, after, strict=True)
                    ]
                    print(
                        f"{connections:>4} {direct.requests_per_s:>13,.0f} "
                        f"{relayed.requests_per_s:>13,.0f} "
                        f"{relayed.requests_per_s / direct.requests_per_s:>6.2f} "
                        f"{relayed.latency_p99_s / direct.latency_p99_s:>9.2f}  "
                        f"{per_request[0]:.0f}, {per_request[1]:.0f}",
                        flush=True,
                    )


@contextlib.contextmanager
def run_relays(
    workdir: Path, upstream_port: int, small_body: bytes, python: Path = Path(sys.executable)
) -> Iterator[PeerTunnel]:
    """Two relays chained in front of the upstream on ``upstream_port``, serving ``GET /1k``.

    ``make bench`` measures them beside the tunnels, as ``relays``: their
    "server" is the exit side (the one visitors reach), their "client" the
    side that dials the upstream. Both run on ``python``, as the tunnel does
    (bench/interpreter.py).

    Raises:
        BenchError: a relay exited, or ``GET /1k`` through them did not answer
            within ``READY_TIMEOUT_S``.
    """
    exit_port, client_port = free_port(), free_port()
    client_side = _relay("client side", client_port, upstream_port, workdir, python)
    exit_side = _relay("exit side", exit_port, client_port, workdir, python)
    with running(client_side), running(exit_side):
        wait_until(
            lambda: serves(exit_port, small_body, exit_side, client_side),
            READY_TIMEOUT_S,
            f"GET {SMALL_PATH} through the two relays answering 200",
        )
        yield PeerTunnel(RELAYS, exit_port, None, exit_side, client_side)


def _relay(side: str, listen_port: int, target_port: int, workdir: Path, python: Path) -> Child:
    args = [str(python), "-m", "bench.relay", str(listen_port), str(target_port)]
    log = workdir / f"relay-{side.replace(' ', '-')}.log"
    return Child(f"relay ({side})", args, log, cwd=REPO_ROOT)


def _wrk(wrk: Path, port: int, connections: int, duration_s: int) -> WrkResult:
    """A warm-up, then the measurement, of ``GET /1k`` on ``port``."""
    url = f"http://{LOOPBACK}:{port}{SMALL_PATH}"
    run_wrk(wrk, url, connections, 1, WARMUP_S, REPO_ROOT)
    progress(f"wrk c={connections} on port {port} for {duration_s} s")
    return run_wrk(wrk, url, connections, 1, duration_s, REPO_ROOT)


if __name__ == "__main__":
    sys.exit(main())
