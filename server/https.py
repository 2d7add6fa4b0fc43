"""The public HTTPS port: each visitor counted under the limits as accepted, then its handshake.

``loop.create_server(ssl=…)`` would hand a visitor to the exit server only
once its TLS handshake is done, so connections in their handshake would
escape ``--max-connections`` and the limit per address: one host opening
connections and never finishing a handshake could hold descriptors and
TLS state without bound. Here, as on the control port, the exit server
accepts each connection itself (:class:`server.listen.Acceptor`),
admits it under the same limits as a plain HTTP visitor (one beyond them is
closed at once: no HTTP can be said before TLS), and only then runs the
handshake, within the head timeout. After it, the visitor is the same
:class:`server.proxy.VisitorConnection` as on the plain port, over TLS.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

from server.listen import Acceptor, keep_alive, listening
from server.proxy import PublicServer, VisitorConnection

logger = logging.getLogger("homeport.server")


class HttpsPort:
    """Listens on the HTTPS port for ``public``, with the TLS context ``tls``."""

    def __init__(self, public: PublicServer, tls: ssl.SSLContext) -> None:
        self.public = public
        self.tls = tls
        self._acceptors: list[Acceptor] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def listen(self, host: str | None, port: int) -> list[tuple[str, int]]:
        """Start listening; return the bound addresses.

        Raises:
            OSError: the port cannot be bound.
        """
        config = self.public.config
        listeners = listening(host, port, config.backlog)
        for listener in listeners:
            if config.tcp_keepalive_s is not None:
                keep_alive(listener, config.tcp_keepalive_s)  # inherited by each accepted
            self._acceptors.append(Acceptor(listener, self._admit, "the HTTPS port"))
        return [listener.getsockname()[:2] for listener in listeners]

    def _admit(self, sock: socket.socket, host: str) -> None:
        admitted = self.public.admit(host)
        if isinstance(admitted, bytes):  # refused, and counted; no HTTP before TLS
            sock.close()
            return
        visitor = VisitorConnection(self.public, admitted)
        self.public.tls_handshakes.add(visitor)
        task = asyncio.get_running_loop().create_task(self._handshake(sock, visitor, admitted))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handshake(self, sock: socket.socket, visitor: VisitorConnection, key: str) -> None:
        public = self.public
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: visitor,
                sock,
                ssl=self.tls,
                ssl_handshake_timeout=public.config.head_timeout_s,
            )
        except BaseException as exc:
            sock.close()
            if visitor in public.tls_handshakes:  # never handed over: its count is ours to end
                public.tls_handshakes.discard(visitor)
                public.per_address.release(key)
            if not isinstance(exc, OSError):  # cancelled: the port is closing
                raise
            # No certificate yet, a scanner, a visitor that gave up, the head
            # timeout (ssl.SSLError and TimeoutError are OSErrors): debug only,
            # or every probe of the port would be a line.
            logger.debug("TLS handshake on the HTTPS port failed: %s", exc)

    def close(self) -> None:
        """Stop accepting, and end the handshakes in progress."""
        for acceptor in self._acceptors:
            acceptor.close()
        for task in list(self._tasks):
            task.cancel()
        self._acceptors = []
