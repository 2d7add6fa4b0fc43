"""Listening sockets, bound before the event loop is given them.

``loop.create_server(factory, host, port)`` resolves ``host`` with the loop's
``getaddrinfo``: uvloop encodes it with the IDNA codec (``unicodedata`` and
``stringprep`` loaded for good) and runs the lookup on libuv's thread pool,
even for a numeric address, starting four threads that then idle for the
life of the process. The exit server resolves its bind address once, at
start, with the blocking call (a numeric address, or none for every
interface, needs no DNS), binds the sockets as asyncio would, and hands them
over: 0.2 MiB less resident memory, and no threads (docs/performance.md).

Options set on a listening socket are given, on Linux, to every connection it
accepts: TCP keep-alive is set here once (:func:`keep_alive`), not with a
system call per visitor. TCP_NODELAY needs nothing of ours: uvloop (and
asyncio) set it on every TCP transport.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any, Final

logger = logging.getLogger("homeport.server")

#: unanswered keep-alive probes before the kernel drops a connection: Go's
#: default since 1.23, so that of inlets, frp, Caddy and Traefik
KEEPALIVE_PROBES: Final = 9
#: accept() failing for want of descriptors or memory is retried after this
ACCEPT_RETRY_S: Final = 1.0
#: connections accepted in one go before the loop runs anything else
ACCEPT_BATCH: Final = 64
#: accept() errors that concern one connection only (accept(2)): the next one is accepted
_ONE_CONNECTION: Final = frozenset(
    {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR, errno.EAGAIN}
)


async def serve(
    factory: Callable[[], asyncio.BaseProtocol],
    host: str | None,
    port: int,
    *,
    keepalive_s: int | None = None,
    **options: Any,
) -> tuple[list[asyncio.Server], list[tuple[str, int]]]:
    """Serve ``factory``'s protocol on every address ``host`` names; the servers and addresses.

    With ``keepalive_s``, every accepted connection has TCP keep-alive
    (:func:`keep_alive`). ``options`` go to ``loop.create_server``
    (``backlog``, ``ssl``, …).

    Raises:
        OSError: as :func:`bind`.
    """
    loop = asyncio.get_running_loop()
    servers, addresses = [], []
    for sock in bind(host, port):
        if keepalive_s is not None:
            keep_alive(sock, keepalive_s)
        addresses.append(sock.getsockname()[:2])
        servers.append(await loop.create_server(factory, sock=sock, **options))
    return servers, addresses


class Acceptor:
    """Accepts connections on ``listener`` as they come, each given to ``admit`` with its address.

    For a port whose connections are counted under limits before they cost
    anything (a TLS handshake): ``admit`` decides, and closes or keeps the
    socket. The listener is one of the loop's readers, so a connection
    costs an ``accept`` and no future or task; a burst is taken up to
    ACCEPT_BATCH at a time, then the loop runs its other work. An error
    of one connection moves on to the next; running out of descriptors or
    memory pauses accepting for ACCEPT_RETRY_S (at once would spin), since
    the connections that hold them may close.
    """

    def __init__(
        self,
        listener: socket.socket,
        admit: Callable[[socket.socket, str], None],
        port_name: str,
    ) -> None:
        self.listener = listener
        self.admit = admit
        self.port_name = port_name
        self._loop = asyncio.get_running_loop()
        self._retry: asyncio.TimerHandle | None = None
        self._loop.add_reader(listener.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ONE_CONNECTION:
                    continue
                logger.warning(
                    "cannot accept a connection on %s: %s; retrying in %.0f s",
                    self.port_name,
                    exc.strerror or exc,
                    ACCEPT_RETRY_S,
                )
                self._loop.remove_reader(self.listener.fileno())
                self._retry = self._loop.call_later(ACCEPT_RETRY_S, self._resume)
                return
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as on every socket
                self.admit(sock, str(peer[0]) if isinstance(peer, tuple) else "-")
            except OSError as exc:  # the caller reset the connection already
                logger.debug(
                    "dropped a connection on %s as it was accepted: %s", self.port_name, exc
                )
                sock.close()

    def _resume(self) -> None:
        self._retry = None
        self._loop.add_reader(self.listener.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting and close the listening socket."""
        if self._retry is not None:
            self._retry.cancel()
        elif self.listener.fileno() >= 0:
            self._loop.remove_reader(self.listener.fileno())
        self.listener.close()


def listening(host: str | None, port: int, backlog: int) -> list[socket.socket]:
    """Sockets bound (:func:`bind`) and listening, non-blocking, for an :class:`Acceptor`.

    Raises:
        OSError: as :func:`bind`; no socket is left open.
    """
    listeners = bind(host, port)
    try:
        for listener in listeners:
            listener.setblocking(False)
            listener.listen(backlog)
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def bind(host: str | None, port: int) -> list[socket.socket]:
    """Bind a TCP socket on every address ``host`` names (all when None).

    As asyncio's ``create_server``: ``SO_REUSEADDR`` on each, IPv6 sockets
    IPv6-only (the IPv4 socket takes the IPv4 traffic), duplicates dropped,
    address families the kernel does not support skipped.

    Raises:
        OSError: the name does not resolve or an address cannot be bound; no
            socket is left open.
    """
    # An ASCII name is passed as bytes: as a str it would be encoded with the
    # IDNA codec, which loads for good what the paragraph above avoids.
    name = host.encode("ascii") if host is not None and host.isascii() else host
    infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    bound: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:
                continue  # e.g. IPv6 disabled in this kernel
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    if not bound:
        raise OSError(f"no address to listen on for {host!r}")
    return bound


def keep_alive(sock: socket.socket, seconds: int) -> None:
    """Probe a peer silent for ``seconds``, every ``seconds``; drop it after 9 unanswered.

    A peer that vanished without a FIN or RST (a phone that lost its
    network, a laptop closed) is then dropped ``10 * seconds`` after it last
    answered, where otherwise a connection that is waiting on the far side
    (a long poll, an event stream with nothing to say) would be held until
    that far side spoke. ``TCP_USER_TIMEOUT`` is given the same total, so a
    peer that stops acknowledging data sent to it is dropped as soon,
    instead of after the ~15 minutes of retransmissions ``tcp_retries2``
    allows; a peer that acknowledges, however slowly, is never cut by it.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, seconds)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, seconds)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    total_ms = (1 + KEEPALIVE_PROBES) * seconds * 1000
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, total_ms)
