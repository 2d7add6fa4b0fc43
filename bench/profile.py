"""``python -m bench.profile``: where the exit server's and the client's time goes under load.

It starts what the benchmark starts (its own nginx and a real ``homeport
server`` and ``homeport client`` on 127.0.0.1), attaches py-spy to the exit
server and to the client, puts one kind of load through the tunnel (wrk at
c=100 on ``/1k``, or 100 MiB downloads or uploads one after another) for
``--duration`` seconds, and writes what py-spy recorded under
``bench/results/profile/``: a speedscope profile (open it at speedscope.app,
or with ``npx speedscope FILE``) and an SVG flame graph (open it in a browser),
one of each per process. Each format is a separate recording under the same
load, one after the other: py-spy writes one format per recording, and two
samplers at once would take twice the CPU from the processes measured.

py-spy samples from outside the process (it reads its memory), so the
processes run the code being measured, unchanged; it pauses them briefly for
each sample unless ``--nonblocking``. On 2 cores the sampler takes some CPU
from the tunnel: throughput while profiling is lower than the benchmark's, but
the shares of time in each function are what to read. ``--native`` adds the C
frames (uvloop, httptools, the websocket's masking).

Every process is ended by its PID in ``finally`` blocks, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from bench.errors import BenchError, run_command
from bench.machine import read_nginx_build
from bench.measure import progress, upload_body
from bench.processes import LOOPBACK, Child, running, wait_until
from bench.report import iso_utc, stamp
from bench.tools import ToolPaths, ensure_tools
from bench.transfer import download, upload
from bench.tunnel import REPO_ROOT, Tunnel, run_tunnel
from bench.upstream import (
    LARGE_BYTES,
    LARGE_PATH,
    SMALL_PATH,
    UPLOAD_PATH,
    Upstream,
    run_nginx,
    write_site,
)
from bench.wrk import run_wrk

PROFILE_DIR: Final = Path(__file__).resolve().parent / "results" / "profile"
LOADS: Final = ("wrk", "download", "upload")
FORMATS: Final = {"speedscope": "speedscope.json", "flamegraph": "svg"}
DEFAULT_DURATION_S: Final = 20
DEFAULT_CONNECTIONS: Final = 100
DEFAULT_RATE_HZ: Final = 100
ATTACH_TIMEOUT_S: Final = 30.0
# py-spy stops by itself after its --duration; this bounds the wait for its file.
WRITE_TIMEOUT_S: Final = 60.0
# The duration bounds the transfer loop; this bounds its count whatever happens.
MAX_TRANSFERS: Final = 1000
_ATTACHED: Final = b"Sampling process"


def main(argv: Sequence[str] | None = None) -> int:
    """Profile the exit server and the client under load; return the exit status."""
    args = parse_args(argv)
    status, written = run_command("bench.profile", lambda: profile(args))
    if written is None:
        return status
    print("wrote:")
    for path in written:
        print(f"  {path}")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description="Record the homeport exit server and client with py-spy under load.",
    )
    parser.add_argument(
        "--load",
        choices=LOADS,
        default="wrk",
        help=f"wrk: GET {SMALL_PATH} kept alive at --connections (default); download or "
        "upload: 100 MiB at a time, one after another",
    )
    parser.add_argument(
        "--duration",
        type=int,
        default=DEFAULT_DURATION_S,
        metavar="SECONDS",
        help=f"load and recording time, per format (default {DEFAULT_DURATION_S})",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=DEFAULT_CONNECTIONS,
        metavar="N",
        help=f"wrk's connections (default {DEFAULT_CONNECTIONS})",
    )
    parser.add_argument(
        "--format",
        choices=[*FORMATS, "both"],
        default="both",
        help="speedscope, flamegraph (SVG) or both, one recording each (default both)",
    )
    parser.add_argument(
        "--rate",
        type=int,
        default=DEFAULT_RATE_HZ,
        metavar="HZ",
        help=f"samples per second (default {DEFAULT_RATE_HZ})",
    )
    parser.add_argument("--native", action="store_true", help="include C frames (py-spy --native)")
    parser.add_argument(
        "--nonblocking",
        action="store_true",
        help="do not pause the processes to sample them (less exact stacks)",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=PROFILE_DIR,
        metavar="DIR",
        help="where the profiles go (default bench/results/profile)",
    )
    args = parser.parse_args(argv)
    if args.duration < 1 or args.connections < 1 or args.rate < 1:
        parser.error("--duration, --connections and --rate must be at least 1")
    if args.native and args.nonblocking:
        parser.error("--native needs to pause the processes: drop --nonblocking")
    return args


def find_py_spy() -> Path:
    """py-spy beside this Python (the venv's bin) or on PATH.

    Raises:
        BenchError: it is not installed.
    """
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return beside
    found = shutil.which("py-spy")
    if found is None:
        raise BenchError("py-spy is not installed: .venv/bin/pip install -e '.[bench]'")
    return Path(found)


def profile(args: argparse.Namespace) -> list[Path]:
    """Start nginx and a tunnel, and record both tunnel processes under load once per format.

    Raises:
        BenchError: a tool, a process, py-spy or the load failed.
    """
    py_spy = find_py_spy()
    tools = ensure_tools()
    nginx_build = read_nginx_build(tools.nginx, REPO_ROOT)
    formats = list(FORMATS) if args.format == "both" else [args.format]
    prefix = f"{stamp(iso_utc(time.time()))}-{args.load}"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="homeport-profile-") as temp:
        workdir = Path(temp)
        small_body = write_site(workdir)
        with (
            run_nginx(tools.nginx, workdir, nginx_build, small_body) as upstream,
            run_tunnel(workdir, upstream.url, small_body, label="profile") as tunnel,
        ):
            progress(f"tunnel up: visitors on {LOOPBACK}:{tunnel.visitor_port}")
            for output_format in formats:
                outputs = {
                    side: args.results_dir / f"{prefix}-{side}.{FORMATS[output_format]}"
                    for side in ("server", "client")
                }
                _record(args, py_spy, output_format, outputs, workdir, tools, tunnel, upstream)
                written += outputs.values()
    return written


def _record(
    args: argparse.Namespace,
    py_spy: Path,
    output_format: str,
    outputs: dict[str, Path],
    workdir: Path,
    tools: ToolPaths,
    tunnel: Tunnel,
    upstream: Upstream,
) -> None:
    """One recording of the exit server and the client, in ``output_format``, under load."""
    pids = {"server": tunnel.server.pid, "client": tunnel.client.pid}
    samplers = {
        side: Child(
            f"py-spy ({side})",
            _py_spy_args(args, py_spy, output_format, pids[side], outputs[side]),
            workdir / f"py-spy-{side}-{output_format}.log",
            cwd=REPO_ROOT,
        )
        for side in pids
    }
    with running(samplers["server"]), running(samplers["client"]):
        for side, sampler in samplers.items():
            wait_until(
                functools.partial(_attached, sampler),
                ATTACH_TIMEOUT_S,
                f"py-spy attaching to the {side}",
            )
        progress(f"recording {output_format} for {args.duration} s under {args.load} load")
        summary = _load(args, tools, tunnel, upstream)
        progress(summary)
        for side, sampler in samplers.items():
            if not sampler.wait_exited(WRITE_TIMEOUT_S + args.duration):
                raise BenchError(f"py-spy ({side}) did not finish{sampler.log_tail()}")
            if sampler.exit_status() != 0 or not outputs[side].exists():
                raise BenchError(
                    f"py-spy ({side}) exited with status {sampler.exit_status()} "
                    f"and wrote no {outputs[side].name}{sampler.log_tail()}"
                )


def _py_spy_args(
    args: argparse.Namespace, py_spy: Path, output_format: str, pid: int, output: Path
) -> list[str]:
    """``py-spy record`` for ``pid`` over the load's duration (plus a second for the ramp)."""
    command = [
        str(py_spy),
        "record",
        f"--pid={pid}",
        f"--rate={args.rate}",
        f"--duration={args.duration + 1}",
        f"--format={output_format}",
        f"--output={output}",
    ]
    if args.native:
        command.append("--native")
    if args.nonblocking:
        command.append("--nonblocking")
    return command


def _attached(sampler: Child) -> bool:
    """Whether py-spy has started sampling (it says so on stderr).

    Raises:
        BenchError: py-spy has exited (it could not attach).
    """
    sampler.check_running()
    return sampler.log_path is not None and _ATTACHED in sampler.log_path.read_bytes()


def _load(args: argparse.Namespace, tools: ToolPaths, tunnel: Tunnel, upstream: Upstream) -> str:
    """Put ``args.load`` through the tunnel for ``args.duration`` seconds; describe what it did."""
    port = tunnel.visitor_port
    if args.load == "wrk":
        url = f"http://{LOOPBACK}:{port}{SMALL_PATH}"
        result = run_wrk(tools.wrk, url, args.connections, 1, args.duration, REPO_ROOT)
        return (
            f"wrk c={args.connections}: {result.requests_per_s:,.0f} req/s, "
            f"{result.errors} errors (while profiled)"
        )
    deadline = time.monotonic() + args.duration
    done = 0
    carried = 0
    while time.monotonic() < deadline and done < MAX_TRANSFERS:
        if args.load == "download":
            result_bytes = download(tools.curl, port, LARGE_PATH, LARGE_BYTES, REPO_ROOT).bytes
        else:
            body = upload_body(upstream)
            result_bytes = upload(tools.curl, port, UPLOAD_PATH, body, REPO_ROOT).bytes
        done += 1
        carried += result_bytes
    return f"{args.load}: {done} x 100 MiB, {carried / args.duration / 2**20:,.0f} MiB/s"


if __name__ == "__main__":
    raise SystemExit(main())
