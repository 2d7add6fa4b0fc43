"""Upstreams: the LAN services a client serves, and the routes that name them.

``--upstream http://127.0.0.1:8080`` serves every host without a route of
its own (the default route); ``--upstream fn.example.com=http://127.0.0.1:8080``
serves that host only. The exit server only ever names a route; the client
alone decides the address it dials, so a compromised server cannot make a Pi
connect anywhere else on its LAN.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import urllib.parse
from dataclasses import dataclass

from tunnel.errors import ConfigError

DEFAULT_ROUTE = ""
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


@dataclass(frozen=True, slots=True)
class Upstream:
    """One route and the upstream that serves it."""

    route: str  #: host name the route serves; "" for the default route
    url: str  #: as the user wrote it
    host: str  #: address to dial
    port: int
    rewrite_host: bool = False  #: send the upstream's own host:port as Host

    @property
    def authority(self) -> str:
        """``host:port`` as a Host header names the upstream."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def describe(self) -> str:
        return f"{self.route or 'default route'} -> {self.url}"


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


def parse_upstreams(
    specs: list[str] | tuple[str, ...], rewrite_hosts: frozenset[str] = frozenset()
) -> tuple[Upstream, ...]:
    """Parse every ``--upstream``; each route may appear once.

    Raises:
        ConfigError: no upstream, a malformed one, or a route given twice.
    """
    if not specs:
        raise ConfigError(
            "give at least one --upstream, for example --upstream http://127.0.0.1:8080"
        )
    upstreams = tuple(parse_upstream(spec, rewrite_hosts=rewrite_hosts) for spec in specs)
    seen: set[str] = set()
    for upstream in upstreams:
        if upstream.route in seen:
            raise ConfigError(f"route {upstream.route or 'default'} is given twice")
        seen.add(upstream.route)
    unknown = rewrite_hosts - {u.route or "default" for u in upstreams}
    if unknown:
        raise ConfigError(f"--rewrite-host names unknown routes: {', '.join(sorted(unknown))}")
    return upstreams
