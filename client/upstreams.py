"""Upstreams: the LAN services a client serves, and the routes that name them.

``--upstream http://127.0.0.1:8080`` serves every host without a route of
its own (the default route); ``--upstream fn.example.com=http://127.0.0.1:8080``
serves that host only; ``--tcp 2222=127.0.0.1:22`` serves the exit server's
raw TCP port 2222 (route ``tcp:2222``; server/tcp.py). The exit server only
ever names a route; the client alone decides the address it dials, so a
compromised server cannot make a Pi connect anywhere else on its LAN.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import re
import urllib.parse
from dataclasses import dataclass

from tunnel.errors import ConfigError
from tunnel.frames import TCP_ROUTE_PREFIX, tcp_route

DEFAULT_ROUTE = ""
#: the PROXY protocol versions ``--proxy-protocol`` names (server/proxy_protocol.py)
PROXY_PROTOCOL_VERSIONS = {"v1": 1, "v2": 2}
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


@dataclass(frozen=True, slots=True)
class Upstream:
    """One route and the upstream that serves it."""

    route: str  #: host name the route serves; "" for the default route; ``tcp:PORT``
    url: str  #: as the user wrote it
    host: str  #: address to dial
    port: int
    rewrite_host: bool = False  #: send the upstream's own host:port as Host
    allow_paths: tuple[str, ...] = ()  #: the only path prefixes the public may reach
    #: for a raw TCP port: the PROXY protocol version the exit server opens each
    #: connection with (``--proxy-protocol``), 0 for none
    proxy_protocol: int = 0

    @property
    def authority(self) -> str:
        """``host:port`` as a Host header names the upstream."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def tcp_port(self) -> int | None:
        """The exit server's public port this upstream serves, for a raw TCP one."""
        if not self.route.startswith(TCP_ROUTE_PREFIX):
            return None
        return int(self.route.removeprefix(TCP_ROUTE_PREFIX))

    def describe(self) -> str:
        if self.tcp_port is not None:
            proxy = f" (PROXY protocol v{self.proxy_protocol})" if self.proxy_protocol else ""
            return f"TCP port {self.tcp_port} -> {self.authority}{proxy}"
        paths = f" (only {', '.join(self.allow_paths)})" if self.allow_paths else ""
        return f"{self.route or 'default route'} -> {self.url}{paths}"


def _route_name(text: str) -> str:
    name = text.strip().lower().removesuffix(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(p) for p in name.split(".")):
        raise ConfigError(f"route host {text!r} is not a valid host name")
    return name


def parse_upstream(spec: str, *, rewrite_hosts: frozenset[str] = frozenset()) -> Upstream:
    """Parse ``[HOST=]http://ADDRESS:PORT``.

    Raises:
        ConfigError: the spec is malformed (the message says how to write it).
    """
    route_text, sep, url = spec.partition("=")
    if not sep:
        route_text, url = "", spec
    route = _route_name(route_text) if route_text else DEFAULT_ROUTE
    try:
        parsed = urllib.parse.urlsplit(url.strip())
        port = parsed.port
    except ValueError:
        raise ConfigError(f"upstream {url!r} is not a valid URL") from None
    if parsed.scheme != "http":
        raise ConfigError(
            f"upstream {url!r} must start with http:// (for example http://127.0.0.1:8080)"
        )
    if not parsed.hostname:
        raise ConfigError(f"upstream {url!r} has no host")
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        raise ConfigError(f"upstream {url!r} must not have a path or query; give only the address")
    if parsed.username or parsed.password:
        raise ConfigError(f"upstream {url!r} must not carry credentials")
    host = parsed.hostname
    with contextlib.suppress(ValueError):  # a name, not an IP literal
        host = str(ipaddress.ip_address(host))
    rewrite = (route or "default") in rewrite_hosts
    return Upstream(route, url.strip(), host, port or 80, rewrite_host=rewrite)


def parse_tcp_upstream(spec: str) -> Upstream:
    """Parse ``PUBLIC_PORT=ADDRESS:PORT`` (``--tcp``).

    Raises:
        ConfigError: the spec is malformed (the message says how to write it).
    """
    public, sep, target = spec.partition("=")
    example = "for example --tcp 2222=127.0.0.1:22"
    public_port = _port_number(public)
    if not sep or public_port is None:
        raise ConfigError(f"--tcp {spec!r} must be PUBLIC_PORT=ADDRESS:PORT, {example}")
    try:
        parsed = urllib.parse.urlsplit(f"tcp://{target.strip()}")
        port = parsed.port
    except ValueError:
        raise ConfigError(f"--tcp {spec!r}: {target!r} is not ADDRESS:PORT, {example}") from None
    if not parsed.hostname or port is None or port == 0 or parsed.path or parsed.username:
        raise ConfigError(f"--tcp {spec!r}: {target!r} is not ADDRESS:PORT, {example}")
    host = parsed.hostname
    with contextlib.suppress(ValueError):  # a name, not an IP literal
        host = str(ipaddress.ip_address(host))
    return Upstream(tcp_route(public_port), f"tcp://{target.strip()}", host, port)


def _port_number(text: str) -> int | None:
    """A port number, 1 to 65535, written in ASCII digits; None for anything else."""
    text = text.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and 0 < int(text) < 65536):
        return None
    return int(text)


def parse_upstreams(
    specs: list[str] | tuple[str, ...],
    rewrite_hosts: frozenset[str] = frozenset(),
    allow_paths: tuple[str, ...] = (),
    tcp: list[str] | tuple[str, ...] = (),
    proxy_protocol: list[str] | tuple[str, ...] = (),
) -> tuple[Upstream, ...]:
    """Parse every ``--upstream``, with the ``--rewrite-host`` and ``--allow-path`` that name them,
    and every ``--tcp``, with the ``--proxy-protocol`` that names it.

    Raises:
        ConfigError: no upstream, a malformed one, a route or port given twice,
            or a rewrite, allowlist or PROXY protocol for a route or port that does not exist.
    """
    if not specs and not tcp:
        raise ConfigError(
            "give at least one --upstream, for example --upstream http://127.0.0.1:8080 "
            "(or a --tcp port)"
        )
    allowed = _parse_allow_paths(allow_paths)
    upstreams = []
    seen: set[str] = set()
    for spec in specs:
        upstream = parse_upstream(spec, rewrite_hosts=rewrite_hosts)
        if upstream.route in seen:
            raise ConfigError(f"route {upstream.route or 'default'} is given twice")
        seen.add(upstream.route)
        prefixes = tuple(allowed.get(upstream.route or "default", ()))
        upstreams.append(dataclasses.replace(upstream, allow_paths=prefixes))
    names = {u.route or "default" for u in upstreams}
    versions = _parse_proxy_protocol(proxy_protocol)
    for spec in tcp:
        upstream = parse_tcp_upstream(spec)
        if upstream.route in seen:
            raise ConfigError(f"--tcp port {upstream.tcp_port} is given twice")
        seen.add(upstream.route)
        version = versions.pop(upstream.tcp_port or 0, 0)
        upstreams.append(dataclasses.replace(upstream, proxy_protocol=version))
    if versions:
        ports = ", ".join(str(port) for port in sorted(versions))
        raise ConfigError(f"--proxy-protocol names port {ports}, which no --tcp serves")
    for option, named in (("--rewrite-host", set(rewrite_hosts)), ("--allow-path", set(allowed))):
        unknown = named - names
        if unknown:
            raise ConfigError(f"{option} names unknown routes: {', '.join(sorted(unknown))}")
    return tuple(upstreams)


def _parse_proxy_protocol(specs: list[str] | tuple[str, ...]) -> dict[int, int]:
    """``PORT=v1`` or ``PORT=v2`` pairs (``--proxy-protocol``), PORT a ``--tcp`` port."""
    versions: dict[int, int] = {}
    for spec in specs:
        text, sep, name = spec.partition("=")
        port = _port_number(text)
        version = PROXY_PROTOCOL_VERSIONS.get(name.strip().lower())
        if not sep or port is None:
            raise ConfigError(f"--proxy-protocol {spec!r} must be PORT=v1 or PORT=v2, e.g. 443=v2")
        if version is None:
            raise ConfigError(f"--proxy-protocol {spec!r}: the version is v1 or v2")
        if port in versions:
            raise ConfigError(f"--proxy-protocol port {port} is given twice")
        versions[port] = version
    return versions


def _parse_allow_paths(specs: tuple[str, ...]) -> dict[str, list[str]]:
    """``ROUTE=/prefix/`` pairs (ROUTE a route host, or ``default``)."""
    allowed: dict[str, list[str]] = {}
    for spec in specs:
        route, sep, prefix = spec.partition("=")
        if not sep or not prefix.startswith("/"):
            raise ConfigError(f"--allow-path {spec!r} must look like default=/function/")
        if not (prefix.isascii() and prefix.isprintable()) or "%" in prefix or "\\" in prefix:
            raise ConfigError(f"--allow-path {spec!r}: give a plain path, without escapes")
        if any(part in (".", "..") for part in prefix.split("/")):
            raise ConfigError(f"--allow-path {spec!r}: give a path without . or .. segments")
        key = route.strip().lower().removesuffix(".") or "default"
        allowed.setdefault(key, []).append(prefix)
    return allowed
