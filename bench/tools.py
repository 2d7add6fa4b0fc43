"""The outside programs the benchmark drives: found on PATH, or installed from Debian's packages.

nginx is the upstream, wrk the load generator for small requests, curl the
client for the large download and upload, and OpenSSH (sshd, ssh, ssh-keygen)
the ``ssh -R`` tunnel that homeport is compared with; the peers (bench/peers.py)
need Node.js and npm (for pipenet) and PageKite. When one is missing and we run as root on a
Debian-like system, ``apt-get`` installs it; otherwise the benchmark stops with
the command that would install it. Installing never starts anything the
benchmark uses: it always runs its own nginx and its own sshd from configs in
its temp directory. (Debian's openssh-server package may enable a system sshd
service; the benchmark neither starts, stops nor reads it.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.errors import BenchError

APT_TIMEOUT_S: Final = 600.0
# nginx lives in /usr/sbin, which is not on every user's PATH.
_EXTRA_PATH: Final = ("/usr/sbin", "/sbin")


@dataclass(frozen=True)
class Tool:
    """A program we run and the Debian packages that provide it, preferred first."""

    name: str
    packages: tuple[str, ...]
    field: str  # its attribute of ToolPaths


TOOLS: Final = (
    Tool("nginx", ("nginx-light", "nginx"), "nginx"),
    Tool("wrk", ("wrk",), "wrk"),
    Tool("curl", ("curl",), "curl"),
    Tool("sshd", ("openssh-server",), "sshd"),
    Tool("ssh", ("openssh-client",), "ssh"),
    Tool("ssh-keygen", ("openssh-client",), "ssh_keygen"),
)
PEER_TOOLS: Final = (
    Tool("node", ("nodejs",), "node"),
    Tool("npm", ("npm",), "npm"),
    Tool("pagekite", ("pagekite",), "pagekite"),
)


@dataclass(frozen=True)
class ToolPaths:
    """Where each program was found."""

    nginx: Path
    wrk: Path
    curl: Path
    sshd: Path
    ssh: Path
    ssh_keygen: Path


def find_tool(name: str) -> Path | None:
    """The program ``name`` on PATH (or in /usr/sbin, /sbin), if it is installed."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_PATH])
    found = shutil.which(name, path=search)
    return Path(found) if found else None


@dataclass(frozen=True)
class PeerToolPaths:
    """Where the peers' programs were found."""

    node: Path
    npm: Path
    pagekite: Path


def ensure_tools() -> ToolPaths:
    """Find nginx, wrk, curl and OpenSSH, installing the missing ones with apt-get.

    Raises:
        BenchError: a tool is missing and cannot be installed here.
    """
    return ToolPaths(**_ensure(TOOLS))


def ensure_peer_tools() -> PeerToolPaths:
    """Find Node.js, npm and PageKite, installing the missing ones with apt-get.

    Raises:
        BenchError: a tool is missing and cannot be installed here.
    """
    return PeerToolPaths(**_ensure(PEER_TOOLS))


def _ensure(tools: tuple[Tool, ...]) -> dict[str, Path]:
    """Each of ``tools`` by its ToolPaths field, installing the missing ones first."""
    missing = [tool for tool in tools if find_tool(tool.name) is None]
    if missing:
        install(missing)
    paths = {tool: find_tool(tool.name) for tool in tools}
    still_missing = sorted(tool.name for tool, path in paths.items() if path is None)
    if still_missing:
        raise BenchError(f"still missing after apt-get install: {', '.join(still_missing)}")
    return {tool.field: path for tool, path in paths.items() if path is not None}


def install(missing: list[Tool]) -> None:
    """Install the packages for ``missing`` tools, trying each tool's alternatives in turn.

    Raises:
        BenchError: not root, no apt-get, or no package could be installed.
    """
    names = ", ".join(tool.name for tool in missing)
    first_choice = list(dict.fromkeys(tool.packages[0] for tool in missing))
    if install_packages(names, first_choice, check=False) == 0:
        return
    for tool in missing:
        if find_tool(tool.name) is None and not any(
            _apt_get("install", "-y", "--no-install-recommends", package, check=False) == 0
            for package in tool.packages
        ):
            raise BenchError(
                f"apt-get could not install {tool.name} ({' or '.join(tool.packages)})"
            )


def install_packages(what: str, packages: list[str], *, check: bool = True) -> int:
    """``apt-get install`` the Debian ``packages`` that provide ``what``; return its status.

    Raises:
        BenchError: not root, no apt-get, or (when ``check``) the install failed.
    """
    suggestion = "apt-get install -y " + " ".join(packages)
    if os.geteuid() != 0:
        raise BenchError(f"{what} not installed; run as root, or first: sudo {suggestion}")
    if shutil.which("apt-get") is None:
        raise BenchError(f"{what} not installed and there is no apt-get here; install them")
    print(f"bench: installing {what} from Debian's packages", file=sys.stderr)
    _apt_get("update")
    return _apt_get("install", "-y", "--no-install-recommends", *packages, check=check)


def _apt_get(*args: str, check: bool = True) -> int:
    """Run ``apt-get ARGS`` non-interactively, its output on our stderr; return its status.

    Raises:
        BenchError: it failed (when ``check``) or ran past ``APT_TIMEOUT_S``.
    """
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        completed = subprocess.run(
            ["apt-get", *args],
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr,
            env=env,
            timeout=APT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"apt-get {args[0]} did not finish in {APT_TIMEOUT_S:.0f} s") from None
    if check and completed.returncode != 0:
        raise BenchError(f"apt-get {' '.join(args)} failed with status {completed.returncode}")
    return completed.returncode
