"""Pebble, Let's Encrypt's test ACME server, on 127.0.0.1 (Debian's ``pebble`` package).

Pebble validates for real: for an HTTP-01 challenge it resolves the name
and fetches ``http://NAME:HTTP_PORT/.well-known/acme-challenge/TOKEN``. Names
resolve through ``pebble-challtestsrv``'s mock DNS, which answers every name
with 127.0.0.1 unless told otherwise (:meth:`Pebble.resolve`), so any test
name (``fn.homeport.test``) reaches the exit server under test.

Pebble serves its directory over HTTPS with a certificate made here by a
test CA (:attr:`Pebble.ca_file`); the certificates it issues chain to a root
of its own, made at each start and served on its management port
(:meth:`Pebble.root_pem`).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from tests.e2e.conftest import Processes
from tests.support.certificates import certificate, write_pair
from tests.support.ports import free_port
from tests.support.processes import Process


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nobody used a moment ago (the kernel picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Pebble:
    process: Process
    challtestsrv: Process
    port: int
    management_port: int
    dns_management_port: int
    #: the CA that signed Pebble's own HTTPS certificate (for --acme-ca-file)
    ca_file: Path

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def root_pem(self) -> str:
        """The root Pebble issues certificates under (made anew at each start)."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        url = f"https://127.0.0.1:{self.management_port}/roots/0"
        with urllib.request.urlopen(url, context=context, timeout=10) as answer:
            return str(answer.read().decode())

    def resolve(self, name: str, address: str) -> None:
        """Make Pebble's DNS answer ``name`` with ``address`` (IPv4), and nothing else."""
        self._manage("clear-a", {"host": name})
        self._manage("add-a", {"host": name, "addresses": [address]})

    def _manage(self, command: str, body: dict[str, object]) -> None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.dns_management_port}/{command}",
            data=json.dumps(body).encode(),
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10):  # noqa: S310
            pass


def _test_ca(work: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate for 127.0.0.1 it signed: (CA file, cert file, key file)."""
    ca, ca_key = certificate(["homeport test CA"], sans=[], ca=True, life_days=30)
    cert, key = certificate(
        ["pebble"],
        issuer=(ca.subject, ca_key),
        sans=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
        life_days=30,
    )
    ca_file, _ = write_pair(work, ca, ca_key, cert_name="ca.pem", key_name="ca-key.pem")
    cert_file, key_file = write_pair(work, cert, key)
    return ca_file, cert_file, key_file


def start_pebble(processes: Processes, work: Path, http_port: int) -> Pebble:
    """Pebble and its mock DNS, validating HTTP-01 challenges on ``http_port``."""
    work.mkdir(parents=True, exist_ok=True)
    ca_file, cert_file, key_file = _test_ca(work)
    dns_port, dns_management = free_udp_port(), free_port()
    challtestsrv = processes.start(
        "challtestsrv",
        [
            "pebble-challtestsrv",
            "-dns01", f"127.0.0.1:{dns_port}",
            "-management", f"127.0.0.1:{dns_management}",
            "-http01", "", "-https01", "", "-tlsalpn01", "",
            "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
        ],
    )  # fmt: skip
    challtestsrv.wait_for(r"Starting management server")
    port, management = free_port(), free_port()
    config = work / "pebble-config.json"
    config.write_text(
        json.dumps(
            {
                "pebble": {
                    "listenAddress": f"127.0.0.1:{port}",
                    "managementListenAddress": f"127.0.0.1:{management}",
                    "certificate": str(cert_file),
                    "privateKey": str(key_file),
                    "httpPort": http_port,
                    "tlsPort": free_port(),
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": False,
                }
            }
        )
    )
    process = processes.start(
        "pebble",
        ["pebble", "-config", str(config), "-dnsserver", f"127.0.0.1:{dns_port}"],
        env={"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"},
    )
    process.wait_for(r"Listening on: 127\.0\.0\.1:\d+")
    return Pebble(process, challtestsrv, port, management, dns_management, ca_file)
