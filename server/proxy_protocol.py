"""The PROXY protocol header: who a raw TCP connection really came from.

Through the tunnel, an upstream on the Pi sees every connection to a raw TCP
port come from the client on its own machine. HTTP carries the visitor's
address in ``X-Forwarded-For``; raw TCP has nowhere to put it, so servers
that care (nginx, HAProxy, Caddy, Traefik, Postfix, Dovecot) read it from a
header the proxy sends before the connection's first byte, HAProxy's PROXY
protocol (https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt).
inlets-pro and frp send it on request; so does homeport, for the ports a
client names with ``--proxy-protocol PORT=v1|v2``: the exit server, which
alone knows both addresses, writes the header as the stream's first bytes,
and the client passes it on as it passes everything.

Version 1 is a line of text, version 2 a binary block; servers that accept
one usually accept both. An address of a family we cannot tell (neither
IPv4 nor IPv6) is sent as ``UNKNOWN`` (version 1) or ``LOCAL`` (version 2),
which tells the upstream to use the connection's own address.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any, Final

#: the 12 bytes every version 2 header begins with
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY: Final = 0x21  # version 2, command PROXY
_V2_LOCAL: Final = 0x20  # version 2, command LOCAL
_V2_TCP4: Final = 0x11
_V2_TCP6: Final = 0x21

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def header(version: int, source: Any, destination: Any) -> bytes:
    """The header for a connection from ``source`` to ``destination``, as the socket
    gives them (``getpeername()``, ``getsockname()``: ``(host, port, …)``)."""
    source_ip, destination_ip = _address(source), _address(destination)
    if source_ip is None or destination_ip is None or source_ip.version != destination_ip.version:
        return b"PROXY UNKNOWN\r\n" if version == 1 else V2_SIGNATURE + bytes((_V2_LOCAL, 0, 0, 0))
    source_port, destination_port = int(source[1]), int(destination[1])
    if version == 1:
        family = "TCP4" if source_ip.version == 4 else "TCP6"
        line = f"PROXY {family} {source_ip} {destination_ip} {source_port} {destination_port}\r\n"
        return line.encode("ascii")
    addresses = (
        source_ip.packed + destination_ip.packed + struct.pack("!HH", source_port, destination_port)
    )
    family_byte = _V2_TCP4 if source_ip.version == 4 else _V2_TCP6
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, family_byte, len(addresses)) + addresses


def _address(name: Any) -> Address | None:
    """The IP address of a socket name; an IPv4 address mapped into IPv6 as IPv4."""
    if not isinstance(name, tuple) or len(name) < 2:
        return None
    try:
        address = ipaddress.ip_address(str(name[0]).partition("%")[0])  # no zone id
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
