"""The comparison: the same upstream behind ``ssh -R``, OpenSSH's reverse port forward.

``ssh -R`` is what people use when they have no tunnel software: the machine at
home runs ``ssh -N -R PORT:127.0.0.1:UPSTREAM vm``, and sshd on the VM listens
on PORT and carries each visitor's connection to the home machine as an SSH
channel. So sshd plays the exit server and ssh the client.

Everything is our own and lives in the benchmark's temp directory: an sshd
run in the foreground (``sshd -D -f CONFIG -e``) on 127.0.0.1 as a child we
end by its PID, with its config, host key, authorized key and PID file; and an
ssh client with its own identity and known_hosts, that reads no user or system
config (``-F /dev/null``). The system's sshd, its service and /etc/ssh are
never touched; the only thing outside the temp directory is ``/run/sshd``,
the empty directory sshd running as root insists on (made if missing).

Both sides use OpenSSH's defaults for ciphers and MACs, as a user would (the
cipher is chosen by both defaults: the JSON records it from ``ssh -G``).
Compression is off on both sides: the files are random bytes.
"""

from __future__ import annotations

import contextlib
import getpass
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.errors import BenchError
from bench.processes import (
    LOOPBACK,
    Child,
    descendant_pids,
    free_port,
    run_bounded,
    running,
    wait_until,
)
from bench.tools import ToolPaths
from bench.upstream import SMALL_PATH, serves

READY_TIMEOUT_S: Final = 15.0
KEYGEN_TIMEOUT_S: Final = 30.0
PRIVSEP_DIR: Final = Path("/run/sshd")
_SESSION_EXIT_TIMEOUT_S: Final = 10.0

_SSHD_CONFIG: Final = """\
# Written by homeport's benchmark (bench/ssh_tunnel.py); not the system sshd.
ListenAddress {host}
Port {port}
HostKey {root}/ssh_host_ed25519_key
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
AllowUsers {user}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
HostbasedAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding remote
GatewayPorts no
PermitListen {permit_listen}
X11Forwarding no
AllowAgentForwarding no
AllowStreamLocalForwarding no
PermitTTY no
PermitUserRC no
PermitTunnel no
PrintMotd no
PrintLastLog no
UseDNS no
Compression no
ClientAliveInterval 0
MaxStartups 100
LogLevel INFO
"""


@dataclass(frozen=True)
class SshTunnel:
    """A running sshd and ``ssh -R`` client, and the ports sshd forwards."""

    ports: dict[str, int]  # the upstream URL each forwarded port leads to -> that port
    sshd: Child
    ssh: Child

    def port_for(self, upstream_url: str) -> int:
        """The port on which sshd forwards to ``upstream_url``."""
        return self.ports[upstream_url]


def ssh_version(tools: ToolPaths, cwd: Path) -> str:
    """``OpenSSH_9.2p1 Debian-2+deb12u3, OpenSSL 3.0.15 3 Sep 2024`` (ssh -V prints on stderr)."""
    _, stdout, stderr = run_bounded("ssh -V", [str(tools.ssh), "-V"], KEYGEN_TIMEOUT_S, cwd)
    return (stderr or stdout).strip()


def default_cipher(tools: ToolPaths, cwd: Path) -> str | None:
    """The cipher ssh offers first, which both sides' defaults agree on, from ``ssh -G``."""
    args = [str(tools.ssh), "-F", "/dev/null", "-G", LOOPBACK]
    code, stdout, _ = run_bounded("ssh -G", args, KEYGEN_TIMEOUT_S, cwd)
    for line in stdout.splitlines() if code == 0 else []:
        key, _, value = line.partition(" ")
        if key == "ciphers":
            return value.split(",")[0]
    return None


@contextlib.contextmanager
def run_ssh_tunnel(
    tools: ToolPaths,
    workdir: Path,
    upstream_urls: Sequence[str],
    small_body: bytes,
    *,
    label: str,
) -> Iterator[SshTunnel]:
    """Run sshd and ``ssh -N -R`` forwarding a port to each of ``upstream_urls``.

    The first URL must serve ``/1k`` with ``small_body``: the tunnel is ready
    when ``GET /1k`` through its port answers so. ssh is stopped before sshd,
    so that sshd's connection process ends with it.

    Raises:
        BenchError: a key or the config could not be made, a process exited, or
            the first port did not serve ``/1k`` within ``READY_TIMEOUT_S``.
    """
    root = workdir / f"ssh-{label}"
    root.mkdir(mode=0o700)
    user = getpass.getuser()
    _keygen(tools, root / "ssh_host_ed25519_key")
    _keygen(tools, root / "id_ed25519")
    (root / "authorized_keys").write_text((root / "id_ed25519.pub").read_text())
    sshd_port = free_port()
    ports = {url: free_port() for url in upstream_urls}
    config = root / "sshd_config"
    config.write_text(
        _SSHD_CONFIG.format(
            host=LOOPBACK,
            port=sshd_port,
            root=root,
            user=user,
            permit_listen=" ".join(f"{LOOPBACK}:{port}" for port in ports.values()),
        )
    )
    host_key = (root / "ssh_host_ed25519_key.pub").read_text().split()
    (root / "known_hosts").write_text(f"[{LOOPBACK}]:{sshd_port} {host_key[0]} {host_key[1]}\n")
    if os.geteuid() == 0:
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    code, stdout, stderr = run_bounded(
        "sshd -t", [str(tools.sshd), "-t", "-f", str(config)], KEYGEN_TIMEOUT_S, root
    )
    if code != 0:
        raise BenchError(f"sshd rejected its config {config}: {(stderr or stdout).strip()}")
    sshd = Child(
        "sshd", [str(tools.sshd), "-D", "-e", "-f", str(config)], root / "sshd.log", cwd=root
    )
    ssh = Child("ssh -R", _ssh_args(tools, root, sshd_port, user, ports), root / "ssh.log", root)
    first_port = ports[upstream_urls[0]]
    with running(sshd):
        # sshd writes its PID file once it listens: only then may ssh dial it.
        wait_until(
            lambda: _pid_file_names(sshd, root / "sshd.pid"),
            READY_TIMEOUT_S,
            "sshd writing its PID file",
        )
        with running(ssh):
            wait_until(
                lambda: serves(first_port, small_body, sshd, ssh),
                READY_TIMEOUT_S,
                f"GET {SMALL_PATH} through ssh -R answering 200",
            )
            yield SshTunnel(ports, sshd, ssh)
        # ssh has gone: sshd's process for its connection ends by itself.
        with contextlib.suppress(BenchError):
            wait_until(
                lambda: not _has_descendants(sshd),
                _SESSION_EXIT_TIMEOUT_S,
                "sshd's connection process exiting after ssh",
            )


def _ssh_args(
    tools: ToolPaths, root: Path, sshd_port: int, user: str, ports: dict[str, int]
) -> list[str]:
    """``ssh -N -R ...`` with its own identity and known_hosts, and no other config."""
    args = [
        str(tools.ssh),
        "-F",
        "/dev/null",
        "-N",
        "-T",
        "-p",
        str(sshd_port),
        "-l",
        user,
        "-i",
        str(root / "id_ed25519"),
    ]
    options = {
        "IdentitiesOnly": "yes",
        "IdentityAgent": "none",
        "BatchMode": "yes",
        "UserKnownHostsFile": str(root / "known_hosts"),
        "GlobalKnownHostsFile": "/dev/null",
        "StrictHostKeyChecking": "yes",
        "UpdateHostKeys": "no",
        "ExitOnForwardFailure": "yes",
        "ServerAliveInterval": "10",
        "ControlMaster": "no",
        "ControlPath": "none",
        "Compression": "no",
        "LogLevel": "ERROR",
    }
    for key, value in options.items():
        args += ["-o", f"{key}={value}"]
    for url, port in ports.items():
        host_port = url.removeprefix("http://").rstrip("/")
        args += ["-R", f"{LOOPBACK}:{port}:{host_port}"]
    return [*args, LOOPBACK]


def _keygen(tools: ToolPaths, path: Path) -> None:
    """Make an ed25519 key pair without a passphrase at ``path`` and ``path.pub``.

    Raises:
        BenchError: ssh-keygen failed.
    """
    args = [str(tools.ssh_keygen), "-q", "-t", "ed25519", "-N", "", "-C", "homeport-bench"]
    code, stdout, stderr = run_bounded(
        "ssh-keygen", [*args, "-f", str(path)], KEYGEN_TIMEOUT_S, path.parent
    )
    if code != 0:
        raise BenchError(f"ssh-keygen failed with status {code}: {(stderr or stdout).strip()}")


def _pid_file_names(sshd: Child, pid_file: Path) -> bool:
    """Whether ``pid_file`` holds sshd's PID (raising if sshd has exited).

    Raises:
        BenchError: sshd has exited.
    """
    sshd.check_running()
    try:
        return int(pid_file.read_text().strip()) == sshd.pid
    except (OSError, ValueError):
        return False


def _has_descendants(child: Child) -> bool:
    """Whether sshd still has a process for a connection (it keeps none when idle)."""
    return child.running() and bool(descendant_pids(child.pid))
