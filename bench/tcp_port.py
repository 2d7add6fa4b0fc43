"""``python -m bench.tcp_port``: a raw TCP port (``--tcp-port``) against HTTP, against direct nginx.

One tunnel carries the same nginx two ways: its HTTP port, where the exit
server parses every request and answer, and a raw TCP port (server/tcp.py)
that the client carries to nginx byte for byte, so wrk and curl speak HTTP
to nginx straight through the stream. It measures ``GET /1k`` with wrk
(keep-alive, at each concurrency) and a 100 MiB download with curl, on
nginx directly and through both ways, taking turns, and prints each
figure's ratio to direct in the same round with the CPU the two tunnel
processes spent. The exit server runs compiled and the client pure Python,
as ``make bench`` runs them; docs/performance.md reads the result.

Every process is ended by its PID on the way out, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from bench.errors import run_command
from bench.interpreter import tunnel_python
from bench.machine import read_nginx_build
from bench.measure import progress
from bench.processes import LOOPBACK
from bench.tools import ensure_tools
from bench.transfer import download
from bench.tunnel import REPO_ROOT, Build, compile_bytecode, compiled_tree, run_tunnel
from bench.upstream import LARGE_BYTES, LARGE_PATH, SMALL_PATH, run_nginx, write_site
from bench.wrk import load_arguments, parse_load_arguments, run_wrk

DEFAULT_ROUNDS: Final = 3
WARMUP_S: Final = 1
WAYS: Final = ("direct", "http", "tcp")


def main(argv: Sequence[str] | None = None) -> int:
    """Measure direct nginx, and the tunnel's HTTP and raw TCP ports; print a table."""
    args = parse_args(argv)
    status, _ = run_command("bench.tcp_port", lambda: measure(args))
    return status


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = load_arguments(
        "python -m bench.tcp_port",
        "A raw TCP port of the tunnel against its HTTP port and direct nginx.",
        runs="the tunnel",
        default_rounds=DEFAULT_ROUNDS,
    )
    return parse_load_arguments(parser, argv)


def measure(args: argparse.Namespace) -> None:
    """Start nginx and the tunnel, and print one row per round.

    Raises:
        BenchError: a tool or a process failed, or a way did not serve.
    """
    tools = ensure_tools()
    nginx_build = read_nginx_build(tools.nginx, REPO_ROOT)
    python = tunnel_python(args.python)
    compile_bytecode()
    progress("building the exit server's compiled modules (HOMEPORT_COMPILE=1)")
    build = Build(python.executable, compiled_tree(python))
    compile_bytecode(build.server_tree)
    print(f"the tunnel runs on {python.description}, the exit server compiled")
    with tempfile.TemporaryDirectory(prefix="homeport-tcp-port-") as temp:
        workdir = Path(temp)
        small_body = write_site(workdir)
        with (
            run_nginx(tools.nginx, workdir, nginx_build, small_body) as upstream,
            run_tunnel(
                workdir,
                upstream.url,
                small_body,
                label="tcp",
                build=build,
                tcp_to=upstream.port,
            ) as tunnel,
        ):
            assert tunnel.tcp_port is not None
            ports = {"direct": upstream.port, "http": tunnel.visitor_port, "tcp": tunnel.tcp_port}
            sides = (tunnel.server, tunnel.client)

            def cpu() -> tuple[float, float]:
                return sides[0].cpu_seconds(), sides[1].cpu_seconds()

            def row(what: str, figures: dict[str, tuple[float, tuple[float, float], int]]) -> None:
                """``figures``: per way, its rate, the sides' CPU seconds and its unit count."""
                direct = figures["direct"][0]
                cells = []
                for way in ("http", "tcp"):
                    rate, (server_s, client_s), units = figures[way]
                    cells.append(
                        f"{way} {rate:>10,.0f} ({rate / direct:.2f}; "
                        f"{1e6 * server_s / units:.0f}/{1e6 * client_s / units:.0f})"
                    )
                print(f"{what:<14} direct {direct:>10,.0f}   " + "   ".join(cells), flush=True)

            print("rates (ratio to direct; exit server/client CPU µs per request or per MiB)")
            for connections in args.concurrency:
                url = {way: f"http://{LOOPBACK}:{port}{SMALL_PATH}" for way, port in ports.items()}
                for way in WAYS:
                    run_wrk(tools.wrk, url[way], connections, 1, WARMUP_S, REPO_ROOT)
                for number in range(args.rounds):
                    figures = {}
                    for way in _turn(number):
                        progress(f"wrk c={connections} through {way}")
                        before = cpu()
                        result = run_wrk(
                            tools.wrk, url[way], connections, 1, args.duration, REPO_ROOT
                        )
                        spent = _spent(before, cpu())
                        figures[way] = (result.requests_per_s, spent, max(result.requests, 1))
                    row(f"c={connections}", figures)
            for number in range(args.rounds):
                figures = {}
                for way in _turn(number):
                    progress(f"{LARGE_PATH} through {way}")
                    before = cpu()
                    done = download(tools.curl, ports[way], LARGE_PATH, LARGE_BYTES, workdir)
                    figures[way] = (done.mib_per_s, _spent(before, cpu()), LARGE_BYTES >> 20)
                row("100 MiB MiB/s", figures)


def _turn(number: int) -> tuple[str, ...]:
    """The ways in this round's order: each goes first in turn."""
    shift = number % len(WAYS)
    return WAYS[shift:] + WAYS[:shift]


def _spent(before: tuple[float, float], after: tuple[float, float]) -> tuple[float, float]:
    return after[0] - before[0], after[1] - before[1]


if __name__ == "__main__":
    sys.exit(main())
