"""The columns of the table: where a visitor connects to reach the same nginx.

``direct`` is nginx itself. ``homeport`` is a real exit server and client in
front of it, ``homeport_wss`` the same with the control channel over TLS
(``wss://``, as deployed), ``ssh_r`` sshd and ``ssh -R``. Each tunnel has a *server* side
(the exit server, or sshd with its process for the connection: the public VM)
and a *client* side (the homeport client, or ssh: the machine at home), whose
CPU and memory the benchmark records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from bench.processes import Child, established_connections, wait_until
from bench.ssh_tunnel import SshTunnel
from bench.tunnel import Tunnel
from bench.upstream import Upstream

DIRECT: Final = "direct"
HOMEPORT: Final = "homeport"
HOMEPORT_WSS: Final = "homeport_wss"
SSH_R: Final = "ssh_r"
LABELS: Final = {
    DIRECT: "direct",
    HOMEPORT: "homeport",
    HOMEPORT_WSS: "homeport over wss",
    SSH_R: "ssh -R",
}
SIDES: Final = ("server", "client")
IDLE_TIMEOUT_S: Final = 10.0


@dataclass(frozen=True)
class Target:
    """One way to reach nginx, and the processes on that way."""

    key: str
    port: int
    nginx: Child
    sides: dict[str, Child] = field(default_factory=dict)  # "server" and "client" of a tunnel
    # Returns once no visitor request is in flight (so one run's leftovers never slow the next).
    wait_idle: Callable[[], object] = lambda: None

    @property
    def label(self) -> str:
        """Its name in the table: ``direct``, ``homeport`` or ``ssh -R``."""
        return LABELS[self.key]

    def watched(self) -> dict[str, Child]:
        """The long-running processes whose CPU a measurement records, by name."""
        return {**self.sides, "nginx": self.nginx}


def direct_target(upstream: Upstream) -> Target:
    """nginx itself."""
    return Target(DIRECT, upstream.port, upstream.process)


def homeport_target(upstream: Upstream, tunnel: Tunnel, key: str = HOMEPORT) -> Target:
    """nginx through the homeport tunnel; idle when the exit server has no request in flight."""
    sides = {"server": tunnel.server, "client": tunnel.client}
    return Target(key, tunnel.visitor_port, upstream.process, sides, tunnel.wait_idle)


def ssh_target(upstream: Upstream, ssh: SshTunnel) -> Target:
    """nginx through ``ssh -R``; idle when no visitor connection to sshd's port is left."""
    port = ssh.port_for(upstream.url)

    def wait_idle() -> None:
        def idle() -> bool:
            ssh.sshd.check_running()
            ssh.ssh.check_running()
            return established_connections(port) == 0

        wait_until(idle, IDLE_TIMEOUT_S, f"visitor connections to ssh -R port {port} closing")

    return Target(SSH_R, port, upstream.process, {"server": ssh.sshd, "client": ssh.ssh}, wait_idle)
