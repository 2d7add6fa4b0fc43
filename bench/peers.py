"""The peers: the same upstream behind other self-hosted tunnels that run on this machine.

``ssh -R`` (bench/ssh_tunnel.py) is what people use with no tunnel software.
These are the tunnel programs a homeport user would otherwise pick, one per
language that runs here, each installed from where its users get it and run
with its own defaults:

- **pipenet** (Node.js, from npm): a maintained fork of localtunnel's client
  and server. The client opens up to ten TCP connections to the server
  (localtunnel's default), each carrying one request at a time; the server
  routes a visitor by the first label of its Host header. It runs in its
  single-port mode (``--tunnel-port``), where the client's connections come
  to one port that we bind to 127.0.0.1; otherwise the server would listen
  for them on a random port of every interface.
- **PageKite** (Python, Debian's ``pagekite`` package): a front-end and a
  back-end ``pagekite`` joined by one TCP connection that carries every
  visitor's bytes in chunks, zlib-compressed by default; the front-end
  routes a visitor by its Host header and the kite's shared secret.

Each side is a child of ours, ended by its PID, bound to 127.0.0.1, with its
log in the benchmark's temp directory. pipenet is installed by npm into a
directory of the checkout's ``build/`` (Node.js and npm from Debian's
packages when missing); nothing outside it is written.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.errors import BenchError
from bench.processes import LOOPBACK, Child, free_port, run_bounded, running, wait_until
from bench.tools import PeerToolPaths
from bench.upstream import SMALL_PATH, serves

PIPENET: Final = "pipenet"
PAGEKITE: Final = "pagekite"
PIPENET_VERSION: Final = "1.4.2"
#: the oldest Node.js it runs on: its yargs 18 wants 20.19 (Debian 12's own is 18)
PIPENET_NODE: Final = (20, 19)
READY_TIMEOUT_S: Final = 30.0
NPM_TIMEOUT_S: Final = 300.0
VERSION_TIMEOUT_S: Final = 30.0
#: pipenet routes by the Host header's first label under its --domain.
PIPENET_DOMAIN: Final = "localhost"
PIPENET_SUBDOMAIN: Final = "bench"
#: the kite's name: PageKite routes a visitor by its Host header.
PAGEKITE_KITE: Final = "bench.pagekite.localhost"


@dataclass(frozen=True)
class PeerTunnel:
    """A running peer: its server and client, the port visitors use and the Host they send."""

    key: str
    port: int
    host: str | None  # None: whatever wrk and curl send
    server: Child
    client: Child


def pipenet_script(install_dir: Path) -> Path:
    """Where npm puts pipenet's command-line entry point under ``install_dir``."""
    return install_dir / "node_modules" / "pipenet" / "dist" / "cli.js"


def ensure_pipenet(tools: PeerToolPaths, install_dir: Path) -> Path:
    """pipenet at ``PIPENET_VERSION`` under ``install_dir``, installed with npm if missing.

    Returns its entry point, run with ``node``.

    Raises:
        BenchError: Node.js is too old for it, npm failed, or installed something else.
    """
    install_dir.mkdir(parents=True, exist_ok=True)
    found_node = node_version(tools, install_dir)
    if found_node < PIPENET_NODE:
        wanted = ".".join(map(str, PIPENET_NODE))
        raise BenchError(
            f"pipenet {PIPENET_VERSION} needs Node.js {wanted} or later (its yargs 18 does); "
            f"{tools.node} is {'.'.join(map(str, found_node))}"
        )
    script = pipenet_script(install_dir)
    if installed_version(install_dir) != PIPENET_VERSION:
        args = [
            str(tools.npm),
            "install",
            "--prefix",
            str(install_dir),
            "--no-audit",
            "--no-fund",
            "--no-save",
            "--loglevel=error",
            f"pipenet@{PIPENET_VERSION}",
        ]
        code, stdout, stderr = run_bounded("npm install", args, NPM_TIMEOUT_S, install_dir)
        if code != 0:
            raise BenchError(
                f"npm could not install pipenet@{PIPENET_VERSION} into {install_dir}: "
                f"{(stderr or stdout).strip()[-2000:]} (or leave the peers out: --no-peers)"
            )
    found = installed_version(install_dir)
    if found != PIPENET_VERSION or not script.is_file():
        raise BenchError(
            f"npm installed pipenet {found or 'nothing'} into {install_dir}, "
            f"expected {PIPENET_VERSION} with {script}"
        )
    return script


def node_version(tools: PeerToolPaths, cwd: Path) -> tuple[int, ...]:
    """``node --version`` as numbers: ``v20.19.2`` -> (20, 19, 2); () when it says something else.

    Raises:
        BenchError: node did not run.
    """
    code, stdout, stderr = run_bounded(
        "node --version", [str(tools.node), "--version"], VERSION_TIMEOUT_S, cwd
    )
    if code != 0:
        raise BenchError(f"{tools.node} --version failed: {(stderr or stdout).strip()}")
    match = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)", stdout.strip())
    return tuple(int(part) for part in match.groups()) if match else ()


def installed_version(install_dir: Path) -> str | None:
    """The version of pipenet installed under ``install_dir``, if any."""
    manifest = install_dir / "node_modules" / "pipenet" / "package.json"
    try:
        version = json.loads(manifest.read_text())["version"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return version if isinstance(version, str) else None


def peer_versions(tools: PeerToolPaths, cwd: Path) -> dict[str, str]:
    """``node``'s and ``pagekite``'s versions, for the report ("unknown" when they don't say).

    pagekite has no ``--version``: its version is ``pagekite.common.APPVER``,
    read with the interpreter its script names.
    """
    versions = {"pipenet": PIPENET_VERSION}
    asks = {"node": [str(tools.node), "--version"]}
    with contextlib.suppress(OSError, UnicodeDecodeError):
        first = tools.pagekite.read_text().split("\n", 1)[0]
        if first.startswith("#!"):
            read = "from pagekite.common import APPVER; print(APPVER)"
            asks["pagekite"] = [*first[2:].split(), "-c", read]
    for name in ("node", "pagekite"):
        code, stdout, _ = (
            run_bounded(f"{name} version", asks[name], VERSION_TIMEOUT_S, cwd)
            if name in asks
            else (1, "", "")
        )
        versions[name] = stdout.strip() if code == 0 and stdout.strip() else "unknown"
    return versions


@contextlib.contextmanager
def run_pipenet(
    tools: PeerToolPaths, script: Path, workdir: Path, upstream_port: int, small_body: bytes
) -> Iterator[PeerTunnel]:
    """A pipenet server and client in front of the upstream on ``upstream_port``.

    Raises:
        BenchError: a process exited, or ``GET /1k`` through it did not answer
            within ``READY_TIMEOUT_S``.
    """
    root = workdir / "pipenet"
    root.mkdir()
    port, tunnel_port = free_port(), free_port()
    server = Child(
        "pipenet server",
        pipenet_server_args(tools.node, script, port, tunnel_port),
        root / "server.log",
        root,
    )
    client = Child(
        "pipenet client",
        pipenet_client_args(tools.node, script, port, upstream_port),
        root / "client.log",
        root,
    )
    host = f"{PIPENET_SUBDOMAIN}.{PIPENET_DOMAIN}"
    with _running_peer(PIPENET, server, client, port, host, small_body) as peer:
        yield peer


def pipenet_server_args(node: Path, script: Path, port: int, tunnel_port: int) -> list[str]:
    """``pipenet server`` on 127.0.0.1, its clients' connections on ``tunnel_port``."""
    return [
        str(node),
        str(script),
        "server",
        "--port",
        str(port),
        "--address",
        LOOPBACK,
        "--domain",
        PIPENET_DOMAIN,
        "--tunnel-port",
        str(tunnel_port),
    ]


def pipenet_client_args(
    node: Path, script: Path, server_port: int, upstream_port: int
) -> list[str]:
    """``pipenet client`` asking the server on ``server_port`` for our subdomain."""
    return [
        str(node),
        str(script),
        "client",
        "--host",
        f"http://{LOOPBACK}:{server_port}",
        "--subdomain",
        PIPENET_SUBDOMAIN,
        "--local-host",
        LOOPBACK,
        "--port",
        str(upstream_port),
    ]


@contextlib.contextmanager
def run_pagekite(
    tools: PeerToolPaths, workdir: Path, upstream_port: int, small_body: bytes
) -> Iterator[PeerTunnel]:
    """A PageKite front-end and back-end in front of the upstream on ``upstream_port``.

    Raises:
        BenchError: a process exited, or ``GET /1k`` through it did not answer
            within ``READY_TIMEOUT_S``.
    """
    root = workdir / "pagekite"
    root.mkdir()
    port, tunnel_port = free_port(), free_port()
    secret = secrets.token_hex(16)
    frontend = Child(
        "pagekite front-end",
        pagekite_frontend_args(tools.pagekite, port, tunnel_port, secret, root / "frontend.log"),
        root / "frontend.out",
        root,
    )
    backend = Child(
        "pagekite back-end",
        pagekite_backend_args(
            tools.pagekite, tunnel_port, upstream_port, secret, root / "backend.log"
        ),
        root / "backend.out",
        root,
    )
    with _running_peer(PAGEKITE, frontend, backend, port, PAGEKITE_KITE, small_body) as peer:
        yield peer


def pagekite_frontend_args(
    pagekite: Path, port: int, tunnel_port: int, secret: str, log: Path
) -> list[str]:
    """A front-end on 127.0.0.1 that accepts our one kite, and no configuration file.

    It listens on ``port`` for visitors and on ``tunnel_port`` for the
    back-end (either would take both): so every connection to ``port`` is a
    visitor's, and the benchmark can wait for them to be gone.
    """
    return [
        str(pagekite),
        "--clean",
        "--nullui",
        "--isfrontend",
        f"--host={LOOPBACK}",
        f"--ports={port},{tunnel_port}",
        "--protos=http",
        f"--domain=http:{PAGEKITE_KITE}:{secret}",
        f"--logfile={log}",
    ]


def pagekite_backend_args(
    pagekite: Path, frontend_port: int, upstream_port: int, secret: str, log: Path
) -> list[str]:
    """A back-end flying our kite from the front-end to the upstream, and no configuration file."""
    return [
        str(pagekite),
        "--clean",
        "--nullui",
        f"--frontend={LOOPBACK}:{frontend_port}",
        f"--service_on=http:{PAGEKITE_KITE}:{LOOPBACK}:{upstream_port}:{secret}",
        f"--logfile={log}",
    ]


def _listening(child: Child, port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port`` (``child`` still running)."""
    child.check_running()
    with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=1.0):
        return True
    return False


@contextlib.contextmanager
def _running_peer(
    key: str, server: Child, client: Child, port: int, host: str, small_body: bytes
) -> Iterator[PeerTunnel]:
    """Start ``server``, then ``client`` once it listens; yield once ``GET /1k`` through them works.

    The client is stopped before the server, as its user would.
    """
    with running(server):
        wait_until(
            lambda: _listening(server, port), READY_TIMEOUT_S, f"the {server.name} listening"
        )
        with running(client):
            wait_until(
                lambda: serves(port, small_body, server, client, host=host),
                READY_TIMEOUT_S,
                f"GET {SMALL_PATH} through {key} answering 200",
                interval_s=0.2,
            )
            yield PeerTunnel(key, port, host, server, client)
