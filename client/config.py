"""The client's configuration: one field per command-line option."""

from __future__ import annotations

import ipaddress
import re
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from client.upstreams import Upstream
from tunnel.errors import ConfigError


@dataclass(frozen=True)
class ClientConfig:
    """Everything ``homeport client`` needs; the CLI maps each option to one field."""

    url: str
    token: str = field(repr=False)
    upstreams: tuple[Upstream, ...]
    name: str
    #: dialling an upstream that takes longer than this fails the stream (504)
    upstream_connect_timeout_s: float = 10.0
    #: websocket connections kept to the exit server, each a session of its own
    connections: int = 1
    #: streams the exit server may have open to us at once, per connection
    max_streams: int = 16384
    heartbeat_interval_s: float = 10.0
    heartbeat_timeout_s: float = 20.0
    #: allow ws:// to a non-loopback server (the token would travel in clear)
    insecure: bool = False
    reconnect_max_delay_s: float = 30.0
    #: TCP, TLS and the websocket handshake to the exit server, together
    handshake_timeout_s: float = 10.0
    #: SHA-256 of the server certificate to pin (wss:// only)
    fingerprint: bytes | None = field(default=None, repr=False)
    #: a CA to trust for the server certificate instead of the system's
    ca_file: Path | None = None


def default_client_name() -> str:
    """The machine's host name, shaped into a valid client name."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:63].strip(".-_")
    return name or "homeport-client"


def control_url(url: str, *, insecure: bool) -> str:
    """The websocket URL of the server's control endpoint, checked.

    ``wss://IP:8123`` becomes ``wss://IP:8123/connect``.

    Raises:
        ConfigError: not ws:// or wss://, or ws:// to a remote host without ``--insecure``.
    """
    try:
        parsed = urllib.parse.urlsplit(url.strip())
        parsed.port  # noqa: B018 - validates the port
    except ValueError:
        raise ConfigError(f"--url {url!r} is not a valid URL") from None
    if parsed.scheme not in ("ws", "wss") or not parsed.hostname:
        raise ConfigError(f"--url must look like wss://HOST:8123, not {url!r}")
    if parsed.query or parsed.fragment or parsed.username or parsed.password:
        raise ConfigError("--url must not carry a query, fragment or credentials")
    if parsed.scheme == "ws" and not insecure and not _is_loopback(parsed.hostname):
        raise ConfigError(
            "refusing ws:// to a remote server: the token would cross the network in clear; "
            "use wss:// (start the server with TLS), or pass --insecure to accept the risk"
        )
    path = parsed.path if parsed.path not in ("", "/") else "/connect"
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, "", ""))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
