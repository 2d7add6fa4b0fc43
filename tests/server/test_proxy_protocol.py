"""The PROXY protocol header (server/proxy_protocol.py), byte for byte as HAProxy's spec
lays it out (proxy-protocol.txt, §2.1 and §2.2). nginx reads it in tests/e2e."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.proxy_protocol import V2_SIGNATURE, header

ports = st.integers(1, 65535)


def test_version_1_names_an_ipv4_visitor_in_one_line() -> None:
    line = header(1, ("203.0.113.7", 51234), ("192.0.2.1", 2222))
    assert line == b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 2222\r\n"


def test_version_1_names_an_ipv6_visitor() -> None:
    line = header(1, ("2001:db8::7", 51234, 0, 0), ("2001:db8::1", 443, 0, 0))
    assert line == b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 443\r\n"


def test_an_ipv4_visitor_on_a_dual_stack_socket_is_named_as_ipv4() -> None:
    mapped = header(1, ("::ffff:203.0.113.7", 51234, 0, 0), ("::ffff:192.0.2.1", 2222, 0, 0))
    assert mapped == b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 2222\r\n"


def test_version_2_is_the_signature_the_command_the_family_and_the_addresses() -> None:
    block = header(2, ("203.0.113.7", 51234), ("192.0.2.1", 2222))
    assert block == (
        b"\r\n\r\n\x00\r\nQUIT\n"  # signature
        + b"\x21"  # version 2, PROXY
        + b"\x11"  # TCP over IPv4
        + b"\x00\x0c"  # 12 bytes follow
        + bytes([203, 0, 113, 7, 192, 0, 2, 1])
        + struct.pack("!HH", 51234, 2222)
    )


@given(st.ip_addresses(v=6), st.ip_addresses(v=6), ports, ports)
def test_version_2_carries_any_ipv6_pair(
    source: ipaddress.IPv6Address, destination: ipaddress.IPv6Address, sport: int, dport: int
) -> None:
    block = header(2, (str(source), sport, 0, 0), (str(destination), dport, 0, 0))
    if source.ipv4_mapped is not None or destination.ipv4_mapped is not None:
        return  # named as IPv4 (above) or, mixed, as unknown (below)
    assert block[:12] == V2_SIGNATURE
    assert block[12:16] == b"\x21\x21\x00\x24"  # PROXY, TCP over IPv6, 36 bytes
    assert block[16:32] == source.packed
    assert block[32:48] == destination.packed
    assert struct.unpack("!HH", block[48:]) == (sport, dport)


@pytest.mark.parametrize(
    ("source", "destination"),
    [
        (("203.0.113.7", 1), ("2001:db8::1", 2, 0, 0)),  # families differ
        ("/run/socket", ("192.0.2.1", 2)),  # not an IP socket
        (None, ("192.0.2.1", 2)),  # no peer name (gone already)
        (("not an address", 1), ("192.0.2.1", 2)),
    ],
)
def test_an_address_that_cannot_be_named_says_so(source: object, destination: object) -> None:
    assert header(1, source, destination) == b"PROXY UNKNOWN\r\n"
    assert header(2, source, destination) == V2_SIGNATURE + b"\x20\x00\x00\x00"  # LOCAL


def test_a_zone_id_is_left_out() -> None:
    line = header(1, ("fe80::7%eth0", 1, 0, 2), ("fe80::1%eth0", 2, 0, 2))
    assert line == b"PROXY TCP6 fe80::7 fe80::1 1 2\r\n"
