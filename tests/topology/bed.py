"""The user's real set-up, played by network namespaces on one machine.

::

    visitor  192.0.2.10                 exit  203.0.113.10
    curl, Chromium                      homeport server :80 (visitors), :8123 (clients, TLS)
         │ eth0                              │ eth0
         │ visit0 192.0.2.1                  │ exit0 203.0.113.1
    ┌────┴───────────────────────────────────┴────┐
    │ internet: routes between the three public   │  the visitor may reach
    │ networks (RFC 5737 ranges), no NAT          │  203.0.113.10 and nothing else
    └──────────────────────┬──────────────────────┘
                           │ home0 198.51.100.1
                           │ wan0  198.51.100.2  (the home's one public address)
    ┌──────────────────────┴──────────────────────┐
    │ router: masquerades the LAN; nothing from   │
    │ the WAN may start a connection in           │
    └──────────────────────┬──────────────────────┘
                           │ lan0  192.168.1.1
                           │                         <- the Pi's uplink: where faults are made
                           │ eth0  192.168.1.2
    ┌──────────────────────┴──────────────────────┐
    │ pi: homeport client; nginx :8080 (the site) │
    │ and functions :8081 (faasd-like), listening │
    │ on all of the Pi's addresses                │
    └─────────────────────────────────────────────┘

Five namespaces: the four of the issue (pi, router, exit, visitor) and
``internet``, which routes between the three public networks as an ISP and
the internet do. So the only way from a visitor to the Pi is the tunnel that
the client dials out.

Veth pairs are created with each end directly in its namespace
(``ip -n A link add eth0 type veth peer name lan0 netns B``): interfaces
never exist in the machine's own namespace, so their short names cannot
collide with anything. Namespace names carry a prefix with the PID of the
pytest process (``hpt1234-1-pi``); a bed whose owner is no longer running is
a leftover of a crashed run and is removed before a new one is built.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from tests.support.processes import Process

PREFIX: Final = "hpt"
_OWNED = re.compile(rf"^{PREFIX}(\d+)-")

PUBLIC_IP: Final = "203.0.113.10"  # the exit node
CONTROL_PORT: Final = 8123  # where the exit server takes clients
INTERNET_EXIT_IP: Final = "203.0.113.1"
WAN_IP: Final = "198.51.100.2"  # the home's one public address, on the router
INTERNET_HOME_IP: Final = "198.51.100.1"
VISITOR_IP: Final = "192.0.2.10"
INTERNET_VISITOR_IP: Final = "192.0.2.1"
LAN: Final = "192.168.1.0/24"
PI_IP: Final = "192.168.1.2"
ROUTER_LAN_IP: Final = "192.168.1.1"

#: the Pi's uplink, in the pi namespace and its other end in the router
UPLINK: Final = "eth0"
ROUTER_LAN: Final = "lan0"
#: metric of the Pi's default route, so a delay line's route can take precedence
UPLINK_METRIC: Final = "100"

COMMAND_TIMEOUT_S: Final = 15.0

ROUTER_RULES: Final = f"""
table ip homeport_nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" ip saddr {LAN} masquerade
    }}
}}
table inet homeport_firewall {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        ip saddr {LAN} oifname "wan0" accept
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "wan0" ct state established,related accept
        iifname "wan0" drop
    }}
}}
"""

INTERNET_RULES: Final = f"""
table inet homeport_internet {{
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "visit0" ip daddr != {PUBLIC_IP} reject with icmp type admin-prohibited
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "visit0" reject with icmp type admin-prohibited
    }}
}}
"""

FAULT_TABLE: Final = "homeport_fault"


class BedError(Exception):
    """A command that builds or changes the test bed failed."""


def run(
    *args: str, stdin: str | None = None, timeout: float = COMMAND_TIMEOUT_S, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; raise BedError, with its stderr, when it fails."""
    result = subprocess.run(
        args, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise BedError(
            f"`{' '.join(args)}` exited with {result.returncode}: {result.stderr.strip()}"
        )
    return result


@dataclass(frozen=True)
class Namespace:
    """One network namespace of the bed: a machine, as far as the network goes."""

    name: str

    def argv(self, *args: str) -> list[str]:
        """The argv that runs ``args`` inside this namespace."""
        return ["ip", "netns", "exec", self.name, *args]

    def run(
        self,
        *args: str,
        stdin: str | None = None,
        timeout: float = COMMAND_TIMEOUT_S,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        return run(*self.argv(*args), stdin=stdin, timeout=timeout, check=check)

    def ip(self, *args: str) -> None:
        run("ip", "-n", self.name, *args)

    def nft(self, rules: str) -> None:
        self.run("nft", "-f", "-", stdin=rules)

    def sysctl(self, *settings: str) -> None:
        self.run("sysctl", "-q", "-w", *settings)

    def pids(self) -> list[int]:
        result = run("ip", "netns", "pids", self.name, check=False)
        return [int(pid) for pid in result.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_namespace(name: str) -> None:
    """Kill what still runs in a namespace of ours (by PID), then delete it."""
    namespace = Namespace(name)
    for pid in namespace.pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    run("ip", "netns", "del", name, check=False)


def remove_stale_beds() -> list[str]:
    """Delete namespaces left by a test run that is no longer running; return their names."""
    listed = run("ip", "netns", "list").stdout.splitlines()
    stale = []
    for line in listed:
        name = line.split()[0] if line.strip() else ""
        match = _OWNED.match(name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            _remove_namespace(name)
            stale.append(name)
    return stale


class TestBed:
    """Builds, faults and tears down the five namespaces."""

    __test__ = False  # not a pytest test class

    def __init__(self, tag: str) -> None:
        self.prefix = f"{PREFIX}{os.getpid()}-{tag}"
        self.pi = Namespace(f"{self.prefix}-pi")
        self.router = Namespace(f"{self.prefix}-router")
        self.internet = Namespace(f"{self.prefix}-internet")
        self.exit = Namespace(f"{self.prefix}-exit")
        self.visitor = Namespace(f"{self.prefix}-visitor")
        self.namespaces = (self.pi, self.router, self.internet, self.exit, self.visitor)

    # -- building ----------------------------------------------------------------------

    def build(self) -> None:
        """Create the namespaces, their links, addresses, routes and firewalls.

        Raises:
            BedError: a command failed (no root, no netns support, a tool missing).
        """
        for namespace in self.namespaces:
            run("ip", "netns", "add", namespace.name)
            # IPv4 only: no router solicitations or duplicate address detection on the links.
            namespace.sysctl(
                "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"
            )
            namespace.ip("link", "set", "lo", "up")
        self._link(self.pi, UPLINK, f"{PI_IP}/24", self.router, ROUTER_LAN, f"{ROUTER_LAN_IP}/24")
        self._link(
            self.router, "wan0", f"{WAN_IP}/24", self.internet, "home0", f"{INTERNET_HOME_IP}/24"
        )
        self._link(
            self.exit, "eth0", f"{PUBLIC_IP}/24", self.internet, "exit0", f"{INTERNET_EXIT_IP}/24"
        )
        self._link(
            self.visitor,
            "eth0",
            f"{VISITOR_IP}/24",
            self.internet,
            "visit0",
            f"{INTERNET_VISITOR_IP}/24",
        )
        self._pi_default_route()
        self.router.ip("route", "add", "default", "via", INTERNET_HOME_IP)
        self.exit.ip("route", "add", "default", "via", INTERNET_EXIT_IP)
        self.visitor.ip("route", "add", "default", "via", INTERNET_VISITOR_IP)
        for namespace in (self.router, self.internet):
            namespace.sysctl("net.ipv4.ip_forward=1")
        self.router.nft(ROUTER_RULES)
        self.internet.nft(INTERNET_RULES)

    @staticmethod
    def _link(
        a: Namespace, a_name: str, a_address: str, b: Namespace, b_name: str, b_address: str
    ) -> None:
        a.ip("link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", b.name)
        a.ip("addr", "add", a_address, "dev", a_name)
        b.ip("addr", "add", b_address, "dev", b_name)
        a.ip("link", "set", a_name, "up")
        b.ip("link", "set", b_name, "up")

    def _pi_default_route(self) -> None:
        self.pi.ip(
            "route", "replace", "default", "via", ROUTER_LAN_IP, "dev", UPLINK,
            "metric", UPLINK_METRIC,
        )  # fmt: skip

    def destroy(self) -> None:
        """Delete every namespace (and with it its links, routes and nftables state)."""
        for namespace in self.namespaces:
            _remove_namespace(namespace.name)

    def existing(self) -> list[str]:
        listed = run("ip", "netns", "list").stdout
        names = {line.split()[0] for line in listed.splitlines() if line.strip()}
        return [n.name for n in self.namespaces if n.name in names]

    # -- faults ------------------------------------------------------------------------

    def uplink_down(self) -> None:
        """Take the Pi's uplink down, as when its cable is pulled or its Wi-Fi drops."""
        self.pi.ip("link", "set", UPLINK, "down")

    def uplink_up(self) -> None:
        """Bring the uplink back, and its default route, as the Pi's DHCP client would."""
        self.pi.ip("link", "set", UPLINK, "up")
        self._pi_default_route()

    def drop_pi_traffic(self, tcp_port: int | None = None) -> None:
        """Make the router drop the Pi's packets, both ways, without a word (no FIN, no RST).

        With ``tcp_port``, only the connection with that local port on the Pi.
        """
        match = f"tcp sport {tcp_port} " if tcp_port else ""
        reply = f"tcp dport {tcp_port} " if tcp_port else ""
        self.router.nft(
            f"""
            table inet {FAULT_TABLE} {{
                chain forward {{
                    type filter hook forward priority filter - 10; policy accept;
                    ip saddr {PI_IP} {match}drop
                    ip daddr {PI_IP} {reply}drop
                }}
            }}
            """
        )

    def restore_pi_traffic(self) -> None:
        self.router.run("nft", "delete", "table", "inet", FAULT_TABLE, check=False)

    def drop_visitor_traffic(self) -> None:
        """Make the internet drop the visitor's packets, both ways, without a word.

        As when a phone loses its network: no FIN, no RST, the exit server's
        packets to it go nowhere.
        """
        self.internet.nft(
            f"""
            table inet {FAULT_TABLE} {{
                chain forward {{
                    type filter hook forward priority filter - 10; policy accept;
                    ip saddr {VISITOR_IP} drop
                    ip daddr {VISITOR_IP} drop
                }}
            }}
            """
        )

    def restore_visitor_traffic(self) -> None:
        self.internet.run("nft", "delete", "table", "inet", FAULT_TABLE, check=False)

    def client_port(self) -> int:
        """The Pi's local port of its established connection to the exit server's control port."""
        result = self.pi.run(
            "ss", "-H", "-t", "-n", "state", "established", "dst", f"{PUBLIC_IP}:{CONTROL_PORT}"
        )
        ports = {int(line.split()[-2].rsplit(":", 1)[1]) for line in result.stdout.splitlines()}
        if len(ports) != 1:
            raise BedError(f"expected one connection to the exit server, found {result.stdout!r}")
        return ports.pop()

    def netem_available(self) -> bool:
        """Whether this kernel has the netem queueing discipline (many minimal kernels do not)."""
        probe = self.internet.run(
            "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms", check=False
        )
        if probe.returncode == 0:
            self.internet.run("tc", "qdisc", "del", "dev", "lo", "root")
            return True
        if "unknown" in probe.stderr.lower():
            return False
        raise BedError(f"tc netem probe failed: {probe.stderr.strip()}")

    @contextlib.contextmanager
    def impaired_uplink(
        self, *, delay_ms: int, jitter_ms: int, loss_percent: float
    ) -> Iterator[str]:
        """Make the Pi's uplink slow, jittery and lossy in both directions; yield how.

        With ``tc netem`` when the kernel has it (a netem qdisc on each end of
        the uplink); otherwise with a user-space delay line (delayline.py) on
        a pair of TUN devices, which the Pi and the router route through
        instead of the veth while it is up.
        """
        if self.netem_available():
            netem = (
                "netem", "delay", f"{delay_ms}ms", f"{jitter_ms}ms", "loss", f"{loss_percent}%",
            )  # fmt: skip
            self.pi.run("tc", "qdisc", "add", "dev", UPLINK, "root", *netem)
            self.router.run("tc", "qdisc", "add", "dev", ROUTER_LAN, "root", *netem)
            try:
                yield "tc netem"
            finally:
                self.pi.run("tc", "qdisc", "del", "dev", UPLINK, "root", check=False)
                self.router.run("tc", "qdisc", "del", "dev", ROUTER_LAN, "root", check=False)
            return
        line = Process(
            "delayline",
            [
                sys.executable, "-m", "tests.topology.delayline",
                self.pi.name, "dl0", self.router.name, "dl1",
                "--delay-ms", str(delay_ms), "--jitter-ms", str(jitter_ms),
                "--loss", str(loss_percent / 100),
            ],
        ).start()  # fmt: skip
        try:
            line.wait_for("delay line up")
            self.pi.ip("link", "set", "dl0", "up")
            self.router.ip("link", "set", "dl1", "up")
            self.pi.ip("route", "add", "default", "dev", "dl0", "src", PI_IP, "metric", "10")
            self.router.ip("route", "add", f"{PI_IP}/32", "dev", "dl1")
            yield "a user-space delay line (no sch_netem in this kernel)"
        finally:
            line.stop(timeout=5)  # its TUN devices, and the routes through them, go with it
