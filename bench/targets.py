"""The columns of the table: where a visitor connects to reach the same nginx.

``direct`` is nginx itself. ``homeport`` is a real exit server and client in
front of it, ``homeport_wss`` the same with the control channel over TLS
(``wss://``, as deployed), ``ssh_r`` sshd and ``ssh -R``, ``pipenet`` and
``pagekite`` the peers (bench/peers.py), which route visitors by their Host
header, and ``relays`` two bare relays (bench/floor.py): what two Python
processes that only copy bytes reach here. Each tunnel has a *server* side
(the exit server, sshd with its process for the connection, the peer's
server, the exit-side relay: the public VM) and a *client* side (the
homeport client, ssh, the peer's client, the other relay: the machine at
home), whose CPU and memory the benchmark records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from bench.peers import PAGEKITE, PIPENET, PeerTunnel
from bench.processes import Child, established_connections, wait_until
from bench.ssh_tunnel import SshTunnel
from bench.tunnel import Tunnel
from bench.upstream import Upstream

DIRECT: Final = "direct"
HOMEPORT: Final = "homeport"
HOMEPORT_WSS: Final = "homeport_wss"
SSH_R: Final = "ssh_r"
#: the floor: two bare relays in Python in front of nginx (bench/floor.py), no tunnel at all
RELAYS: Final = "relays"
LABELS: Final = {
    DIRECT: "direct",
    HOMEPORT: "homeport",
    HOMEPORT_WSS: "homeport over wss",
    SSH_R: "ssh -R",
    PIPENET: "pipenet",
    PAGEKITE: "pagekite",
    RELAYS: "two relays",
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
    #: the Host header visitors send, for a tunnel that routes by it (None: wrk's and curl's own)
    host: str | None = None
    #: a peer: when a measurement through it fails, it leaves the run with a warning
    #: (bench.measure.Dropouts) instead of ending the run and losing every figure
    optional: bool = False

    @property
    def label(self) -> str:
        """Its name in the table: ``direct``, ``homeport``, ``ssh -R``, ``pipenet``, ..."""
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
    sides = {"server": ssh.sshd, "client": ssh.ssh}
    return Target(SSH_R, port, upstream.process, sides, _no_visitors(port, sides))


def peer_target(upstream: Upstream, peer: PeerTunnel) -> Target:
    """nginx through a peer (or the relays); idle when no visitor connection to its port is left."""
    sides = {"server": peer.server, "client": peer.client}
    return Target(
        peer.key,
        peer.port,
        upstream.process,
        sides,
        _no_visitors(peer.port, sides),
        peer.host,
        optional=True,
    )


def _no_visitors(port: int, sides: dict[str, Child]) -> Callable[[], None]:
    """A ``wait_idle``: until no visitor connection to ``port`` is left, the sides still up."""

    def wait_idle() -> None:
        def idle() -> bool:
            for side in sides.values():
                side.check_running()
            return established_connections(port) == 0

        wait_until(idle, IDLE_TIMEOUT_S, f"visitor connections to port {port} closing")

    return wait_idle
