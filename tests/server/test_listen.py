"""The exit server binds its listening sockets itself (server/listen.py)."""

from __future__ import annotations

import errno
import os
import socket

import pytest

from server.listen import bind


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_a_numeric_address_gives_one_socket_bound_to_it() -> None:
    [sock] = bind("127.0.0.1", 0)
    with sock:
        host, port = sock.getsockname()
        assert host == "127.0.0.1"
        assert port > 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)


def test_no_address_binds_every_interface_ipv6_only_beside_ipv4() -> None:
    sockets = bind(None, 0)
    try:
        by_family = {sock.family: sock for sock in sockets}
        assert len(by_family) == len(sockets), "an address was bound twice"
        assert by_family[socket.AF_INET].getsockname()[0] == "0.0.0.0"
        if ipv6_available():
            v6 = by_family[socket.AF_INET6]
            assert v6.getsockname()[0] == "::"
            assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        for sock in sockets:
            sock.close()


def test_a_port_in_use_raises_eaddrinuse_and_leaves_no_socket_open() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        before = open_fds()
        with pytest.raises(OSError, match="in use") as raised:
            bind("127.0.0.1", taken.getsockname()[1])
        assert raised.value.errno == errno.EADDRINUSE
        assert open_fds() == before
