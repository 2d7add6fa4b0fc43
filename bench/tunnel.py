"""The tunnel under test: a real ``homeport server`` and ``homeport client``, as users run them.

Both are subprocesses of this checkout's command line on 127.0.0.1, with
ports we pick and a fresh token file. The benchmark picks the ports itself so
the exit server can run at ``--log-level warning``: its one INFO access-log
line per request is then off, and its cost is measured separately.
"""

from __future__ import annotations

import compileall
import contextlib
import http.client
import json
import os
import ssl
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bench.errors import BenchError
from bench.interpreter import TunnelPython, own_python
from bench.processes import LOOPBACK, Child, free_port, http_get, run_bounded, running, wait_until
from bench.upstream import SMALL_PATH, serves, verifying_context
from tunnel.tls import Certificate, client_context, ensure_self_signed

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
# The checkout's packages, as pyproject.toml lists them (homeport.exitnode is inside homeport).
PACKAGES: Final = ("tunnel", "server", "client", "homeport")
CLIENT_NAME: Final = "bench"
# The client's own default limit on concurrent streams (homeport client --max-streams).
CLIENT_MAX_STREAMS: Final = 16384
READY_TIMEOUT_S: Final = 15.0
IDLE_TIMEOUT_S: Final = 10.0
TOKEN_TIMEOUT_S: Final = 30.0
# On SIGTERM the exit server lets in-flight requests finish; none should be left.
DRAIN_TIMEOUT_S: Final = 2.0
# Building the compiled wheel takes one to two minutes here.
COMPILE_TIMEOUT_S: Final = 900.0


@dataclass(frozen=True)
class Build:
    """What runs the tunnel: the interpreter, and the tree the exit server runs from."""

    python: Path = Path(sys.executable)
    #: :func:`compiled_tree` for the compiled build; the client always runs this checkout
    server_tree: Path = REPO_ROOT


@dataclass(frozen=True)
class Tunnel:
    """A running exit server and client, and how to reach them."""

    visitor_port: int
    control_port: int
    token: str
    access_log: bool
    server: Child
    client: Child
    #: how to reach the control port when it serves TLS (``wss://``), else None
    control_tls: ssl.SSLContext | None = None
    #: the exit server's raw TCP port (``--tcp-port``), when the tunnel has one
    tcp_port: int | None = None
    #: the exit server's HTTPS port for visitors (``--https-port``), when it has one
    https_port: int | None = None

    def status(self) -> dict[str, Any]:
        """The exit server's ``GET /status`` (clients, streams, requests in flight).

        Raises:
            BenchError: the server or the client has exited, or the server did
                not answer 200 with JSON.
        """
        self.server.check_running()
        self.client.check_running()
        headers = {"Authorization": f"Bearer {self.token}"}
        try:
            code, body = http_get(self.control_port, "/status", headers, tls=self.control_tls)
            status: dict[str, Any] = json.loads(body)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise BenchError(f"GET /status on the control port failed: {exc}") from None
        if code != 200:
            raise BenchError(f"GET /status on the control port answered {code}")
        return status

    def wait_idle(self) -> dict[str, Any]:
        """Wait until no request is in flight; return that status.

        Raises:
            BenchError: requests were still in flight after ``IDLE_TIMEOUT_S``.
        """
        last: dict[str, Any] = {}

        def idle() -> bool:
            nonlocal last
            last = self.status()
            return last.get("requests_in_flight") == 0

        wait_until(idle, IDLE_TIMEOUT_S, "requests_in_flight back to 0 on the exit server")
        return last


def write_token(path: Path) -> str:
    """Make a new token with ``homeport token -o PATH`` and return it.

    Raises:
        BenchError: the command failed.
    """
    code, _, stderr = run_bounded(
        "homeport token",
        [*homeport_command(), "token", "-o", str(path)],
        TOKEN_TIMEOUT_S,
        REPO_ROOT,
    )
    if code != 0:
        raise BenchError(f"homeport token failed with status {code}: {stderr.strip()}")
    return path.read_text().strip()


def homeport_command(python: Path = Path(sys.executable)) -> list[str]:
    """The argv that runs this checkout's ``homeport`` command line on ``python``."""
    return [str(python), "-m", "homeport"]


def compiled_tree(python: TunnelPython | None = None) -> Path:
    """A copy of this checkout running the compiled build, as the exit node installs homeport.

    ``scripts/compiled_tree.py`` makes it (``HOMEPORT_COMPILE=1``: the hot
    modules compiled with mypyc beside their sources), built for ``python``
    (by default ours, whose tree ``make test`` uses too), keeping the wheel
    between runs while the sources stay the same.

    Raises:
        BenchError: the build failed (no C compiler, or mypyc refused the code).
    """
    python = python or own_python()
    tree = REPO_ROOT / "build" / ("compiled" if python.own else "compiled-bench-python")
    code, stdout, stderr = run_bounded(
        "scripts/compiled_tree.py",
        [str(python.executable), str(REPO_ROOT / "scripts" / "compiled_tree.py"), str(tree)],
        COMPILE_TIMEOUT_S,
        REPO_ROOT,
    )
    if code != 0:
        raise BenchError(f"building the compiled tree failed: {(stdout + stderr).strip()[-800:]}")
    return tree


def compile_bytecode(root: Path = REPO_ROOT) -> None:
    """Compile the checkout's packages to bytecode, as pip does when it installs homeport.

    An editable install is never compiled, and where ``PYTHONDONTWRITEBYTECODE``
    is set (this VM sets it) every process we start would compile every module
    from source again: slower to start, and 0.4 MiB more resident memory left
    behind by the compiler than an installed homeport has.

    Raises:
        BenchError: a module does not compile.
    """
    for package in PACKAGES:
        if not compileall.compile_dir(root / package, quiet=1):
            raise BenchError(f"cannot compile {package}/ to bytecode")


def clean_environment() -> dict[str, str]:
    """Our environment without ``HOMEPORT_*`` settings, which would change what we measure."""
    return {key: value for key, value in os.environ.items() if not key.startswith("HOMEPORT_")}


@contextlib.contextmanager
def run_tunnel(
    workdir: Path,
    upstream_url: str,
    small_body: bytes,
    *,
    label: str,
    access_log: bool = False,
    routes: Sequence[tuple[str, str]] = (),
    max_streams: int | None = None,
    build: Build = Build(),
    tls: bool = False,
    tcp_to: int | None = None,
    https: Certificate | None = None,
) -> Iterator[Tunnel]:
    """Run an exit server and a client for ``upstream_url``; stop both on the way out.

    With ``access_log`` the exit server runs at INFO, writing its access log to
    /dev/null (the cost of formatting every line is what we want to know);
    otherwise at WARNING, its output kept in a log file for diagnosis.
    ``routes`` are more ``(host, url)`` upstreams for the client to serve.
    ``max_streams`` raises the exit server's limits on visitor connections and
    streams per client (both 1024 by default) to that many, and lifts the
    one per address: every visitor here comes from 127.0.0.1. Both run on
    ``build.python``, the exit server from ``build.server_tree``, the client
    from this checkout, pure Python, as the Pi installs it.
    With ``tls`` the control channel is ``wss://``, as deployed: the exit
    server's self-signed certificate (``--auto-tls``), pinned by the client.
    With ``tcp_to``, the exit server also has a raw TCP port (``--tcp-port``)
    that the client carries to that port on the loopback (``--tcp``).
    With ``https``, the exit server also serves visitors over HTTPS on a port
    of its own, with that certificate (``--https-cert``, ``--https-key``).

    Raises:
        BenchError: a process exited, or ``GET /1k`` through the tunnel (on
            each visitor port) did not answer 200 with the upstream's bytes
            within ``READY_TIMEOUT_S``.
    """
    token_file = workdir / f"token-{label}"
    token = write_token(token_file)
    visitor_port, control_port = free_port(), free_port()
    server_args = [
        *homeport_command(build.python),
        "server",
        f"--bind={LOOPBACK}",
        f"--port={visitor_port}",
        f"--control-port={control_port}",
        f"--token-file={token_file}",
        f"--drain-timeout={DRAIN_TIMEOUT_S}",
        f"--log-level={'info' if access_log else 'warning'}",
    ]
    if max_streams is not None:
        server_args += [
            f"--max-connections={max_streams}",
            "--max-connections-per-address=0",
            f"--max-streams-per-client={max_streams}",
        ]
    control_tls = None
    client_tls_args = []
    if tls:
        data_dir = workdir / f"tls-{label}"
        certificate = ensure_self_signed(data_dir, [LOOPBACK])
        server_args += ["--auto-tls", f"--data-dir={data_dir}"]
        client_tls_args.append(f"--fingerprint={certificate.fingerprint}")
        control_tls = client_context(pinned=True)
    client_args = [
        *homeport_command(build.python),
        "client",
        f"--url={'wss' if tls else 'ws'}://{LOOPBACK}:{control_port}",
        *client_tls_args,
        f"--token-file={token_file}",
        f"--upstream={upstream_url}",
        *(f"--upstream={host}={url}" for host, url in routes),
        f"--name={CLIENT_NAME}",
        "--log-level=info",
    ]
    if max_streams is not None:
        client_args.append(f"--max-streams={max(max_streams, CLIENT_MAX_STREAMS)}")
    tcp_port = None
    if tcp_to is not None:
        tcp_port = free_port()
        server_args.append(f"--tcp-port={tcp_port}")
        client_args.append(f"--tcp={tcp_port}={LOOPBACK}:{tcp_to}")
    https_port = None
    if https is not None:
        https_port = free_port()
        server_args += [
            f"--https-port={https_port}",
            f"--https-cert={https.cert_path}",
            f"--https-key={https.key_path}",
        ]
    server_log = None if access_log else workdir / f"server-{label}.log"
    server = Child("homeport server", server_args, server_log, cwd=build.server_tree)
    client = Child("homeport client", client_args, workdir / f"client-{label}.log", cwd=REPO_ROOT)
    env = clean_environment()
    with running(server, env), running(client, env):
        tunnel = Tunnel(
            visitor_port,
            control_port,
            token,
            access_log,
            server,
            client,
            control_tls,
            tcp_port,
            https_port,
        )
        wait_until(
            lambda: serves(visitor_port, small_body, server, client),
            READY_TIMEOUT_S,
            f"GET {SMALL_PATH} through the tunnel answering 200",
        )
        if https is not None and https_port is not None:
            context = verifying_context(https)
            wait_until(
                lambda: serves(https_port, small_body, server, client, tls=context),
                READY_TIMEOUT_S,
                f"GET {SMALL_PATH} through the tunnel's HTTPS port answering 200",
            )
        yield tunnel
