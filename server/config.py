"""The exit server's configuration: one field per command-line option."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from server.certificates import LETSENCRYPT
from server.limits import MAX_CONNECTIONS_PER_ADDRESS

DEFAULT_PORT: Final = 8000
DEFAULT_CONTROL_PORT: Final = 8123
DEFAULT_HTTPS_PORT: Final = 443


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``homeport server`` needs; the CLI maps each option to one field."""

    #: SHA-256 of the token clients must present
    token_digest: bytes
    #: SHA-256 of a token that reads /metrics and /status and opens no tunnel
    metrics_token_digest: bytes | None = None
    #: interface to bind; None binds every interface (IPv4 and IPv6)
    bind: str | None = None
    port: int = DEFAULT_PORT
    control_port: int = DEFAULT_CONTROL_PORT
    #: raw TCP ports to listen on, each carried to a client that serves it (server/tcp.py)
    tcp_ports: tuple[int, ...] = ()
    #: upstream answer deadline (longer than faasd's own 65 s)
    response_timeout_s: float = 70.0
    #: a visitor's request head must complete within this
    head_timeout_s: float = 10.0
    #: a request body may pause this long between reads
    body_timeout_s: float = 60.0
    #: an idle keep-alive connection is closed after this
    keepalive_timeout_s: float = 30.0
    #: a visitor may leave our writes to it stalled this long, then it is dropped
    send_timeout_s: float = 60.0
    #: a visitor connection silent this long is probed with TCP keep-alive, and
    #: dropped after 9 unanswered probes this far apart (server/listen.py); None: off
    tcp_keepalive_s: int | None = 15
    #: in-flight requests get this long to finish on SIGTERM
    drain_timeout_s: float = 25.0
    max_connections: int = 1024
    #: visitor connections one address (an IPv6 /64) may hold open; 0 for no limit
    max_connections_per_address: int = MAX_CONNECTIONS_PER_ADDRESS
    max_streams_per_client: int = 1024
    #: largest request body accepted (413 above it); None for no limit
    max_body_bytes: int | None = None
    websocket_passthrough: bool = True
    #: an upgraded (WebSocket) connection that carries nothing either way
    #: this long is closed; None for no limit
    websocket_idle_timeout_s: float | None = 300.0
    heartbeat_interval_s: float = 10.0
    heartbeat_timeout_s: float = 20.0
    backlog: int = 1024
    #: certificate and key for the control port (TLS); None serves plain ws://
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: failed authentications an address may make per minute before 429
    max_auth_failures: int = 5
    #: the self-signed certificate's fingerprint, printed at start (--auto-tls)
    tls_fingerprint: str | None = None
    #: the address clients should dial, for the printed client command line
    advertised_host: str | None = None
    #: the token file, named in the printed client command line (never the token)
    token_file_hint: str | None = None
    #: the public HTTPS port, served when a certificate comes from one of below
    https_port: int = DEFAULT_HTTPS_PORT
    #: the HTTPS certificate and key from files (--https-cert), loaded again when they change
    https_cert: Path | None = None
    https_key: Path | None = None
    #: names to get the HTTPS certificate for from an ACME CA (--letsencrypt-domain)
    acme_domains: tuple[str, ...] = ()
    #: contact address given to the CA (its expiry notices)
    acme_email: str | None = None
    #: the ACME CA's directory URL (Let's Encrypt's production one unless told)
    acme_directory: str = LETSENCRYPT
    #: CA certificates to trust for the ACME directory's own HTTPS (a private CA)
    acme_ca_file: Path | None = None
    #: where the ACME account and certificates are kept (--data-dir)
    data_dir: Path | None = None
    #: answer plain HTTP requests with a redirect to HTTPS (ACME challenges excepted)
    https_redirect: bool = False

    @property
    def https(self) -> bool:
        """Whether the public HTTPS port is served."""
        return bool(self.acme_domains) or self.https_cert is not None


def tcp_ports_problem(
    tcp_ports: tuple[int, ...], port: int, control_port: int, https_port: int | None = None
) -> str | None:
    """What is wrong with these ``--tcp-port``s, if anything: each once, no other port.

    One rule for ``homeport server`` and ``homeport exit-node create``,
    which checks it before it creates a node that would never serve.
    ``https_port``: the HTTPS port, when it is served.
    """
    taken = [(port, "--port"), (control_port, "--control-port")]
    if https_port is not None:
        for other, option in taken:
            if https_port and https_port == other:  # 0: any free port, never a clash
                return f"--https-port {https_port} is the {option} already"
        taken.append((https_port, "--https-port"))
    for tcp_port in tcp_ports:
        for other, option in taken:
            if tcp_port == other:
                return f"--tcp-port {tcp_port} is the {option} already"
        if tcp_ports.count(tcp_port) > 1:
            return f"--tcp-port {tcp_port} is given twice"
    return None
