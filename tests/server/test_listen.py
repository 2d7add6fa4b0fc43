"""The exit server binds its listening sockets itself, with their options (server/listen.py)."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import socket

import pytest
import uvloop

from client.forward import Forwarder
from server.listen import ACCEPT_RETRY_S, KEEPALIVE_PROBES, Acceptor, bind, keep_alive, listening
from tests.support.waiting import wait_until
from tests.support.world import running_world


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


def test_keep_alive_sets_probes_and_a_matching_user_timeout() -> None:
    with socket.socket() as sock:
        keep_alive(sock, 7)
        assert options(sock) == {
            "keepalive": 1, "idle": 7, "interval": 7, "probes": KEEPALIVE_PROBES,
            "user_timeout_ms": 7_000 * (1 + KEEPALIVE_PROBES),
        }  # fmt: skip


def options(sock: socket.socket) -> dict[str, int]:
    return {
        "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        "interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        "probes": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        "user_timeout_ms": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
    }


def nodelay(transport: asyncio.BaseTransport | None) -> int:
    assert transport is not None
    sock = transport.get_extra_info("socket")
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


async def sockets_during_a_request(keepalive_s: int | None) -> tuple[dict[str, int], list[int]]:
    """The visitor's socket options on the exit server, and TCP_NODELAY on the visitor's and
    the client's upstream socket, while a request is under way."""
    async with running_world(tcp_keepalive_s=keepalive_s) as world:
        port = world.server.public_addresses[0][1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: example.test\r\n\r\n")
        await wait_until(lambda: world.server.public.in_flight == 1)
        [visitor] = world.server.public.connections
        forwarders = [obj for obj in gc.get_objects() if type(obj) is Forwarder]
        await wait_until(lambda: all(f.transport is not None for f in forwarders))
        assert visitor.transport is not None
        assert len(forwarders) == 1
        found = options(visitor.transport.get_extra_info("socket"))
        nodelays = [nodelay(visitor.transport), nodelay(forwarders[0].transport)]
        writer.close()
        return found, nodelays


LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.mark.parametrize("loop", LOOPS)
def test_visitor_connections_get_keep_alive_from_the_listener(loop: str) -> None:
    """Linux gives an accepted socket its listener's options: no system call per visitor."""
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        found, nodelays = runner.run(sockets_during_a_request(keepalive_s=11))
        assert found == {
            "keepalive": 1, "idle": 11, "interval": 11, "probes": KEEPALIVE_PROBES,
            "user_timeout_ms": 11_000 * (1 + KEEPALIVE_PROBES),
        }  # fmt: skip
        assert nodelays == [1, 1], "the event loop no longer sets TCP_NODELAY on its transports"
        found, _ = runner.run(sockets_during_a_request(keepalive_s=None))
        assert (found["keepalive"], found["user_timeout_ms"]) == (0, 0)


class _FailingOnce:
    """A listening socket whose next accept() fails with ``error`` once."""

    def __init__(self, sock: socket.socket, error: int) -> None:
        self.sock = sock
        self.error: int | None = error
        self.failed_at: float | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> tuple[socket.socket, object]:
        if self.error is not None:
            error, self.error = self.error, None
            self.failed_at = asyncio.get_running_loop().time()
            raise OSError(error, os.strerror(error))
        return self.sock.accept()

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_acceptor_gives_each_connection_with_its_address_and_waits_out_emfile(
    loop: str,
) -> None:
    async def scenario() -> None:
        (listener,) = listening("127.0.0.1", 0, 16)
        port = listener.getsockname()[1]
        failing = _FailingOnce(listener, errno.EMFILE)
        admitted: list[tuple[socket.socket, str, float]] = []

        def admit(sock: socket.socket, host: str) -> None:
            admitted.append((sock, host, asyncio.get_running_loop().time()))

        acceptor = Acceptor(failing, admit, "a test port")  # type: ignore[arg-type]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            await wait_until(lambda: len(admitted) == 3, within=10)
            # Out of descriptors: no retry at once (it would spin), one ACCEPT_RETRY_S later.
            assert failing.failed_at is not None
            assert admitted[0][2] - failing.failed_at >= ACCEPT_RETRY_S * 0.9
            for sock, host, _ in admitted:
                assert host == "127.0.0.1"
                assert not sock.getblocking()
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            acceptor.close()
            for sock, _, _ in admitted:
                sock.close()
            for client in clients:
                client.close()
        assert listener.fileno() == -1

    if loop == "uvloop":
        uvloop.run(scenario())
    else:
        asyncio.run(scenario())
