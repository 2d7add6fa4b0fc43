"""``python -m bench.relay LISTEN_PORT TARGET_PORT``: the least a relay in Python can do.

Each connection accepted on 127.0.0.1:LISTEN_PORT gets its own connection to
127.0.0.1:TARGET_PORT, and the bytes are copied both ways as they come: no
framing, no multiplexing, no HTTP, no flow control beyond the kernel's,
uvloop's transports with TCP_NODELAY (as homeport's). ``python -m
bench.floor`` chains two of them in front of nginx: what a two-process
tunnel written in Python on asyncio reaches on this machine when it does
nothing but relay, connection by connection, the floor homeport's own
figures are read against.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import cast

import uvloop

from bench.processes import LOOPBACK


class _Side(asyncio.Protocol):
    """One connection of a relayed pair: what it reads, the other one writes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None
        self.early: list[bytes] = []  # read before the other connection was up

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        other = self.other
        if other is not None and other.early:
            self.transport.writelines(other.early)
            other.early.clear()

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is not None and other.transport is not None:
            other.transport.write(data)
        else:
            self.early.append(data)

    def eof_received(self) -> bool:
        # One side is done: close the other once what it has queued is sent,
        # and this one with it. Passing the half-close on (write_eof) would be
        # truer to TCP, but uvloop (0.22 and 0.23) aborts the process, a
        # double free in its shutdown callback, when connections that both
        # relays half-close in turn are closed under a stream of new ones.
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()


class _Accepted(_Side):
    """The visitor's side of a pair: dials the target as soon as it is accepted."""

    def __init__(self, target_port: int, dials: set[asyncio.Task[None]]) -> None:
        super().__init__()
        self.target_port = target_port
        self.dials = dials

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        task = asyncio.get_running_loop().create_task(self._dial())
        self.dials.add(task)
        task.add_done_callback(self.dials.discard)

    async def _dial(self) -> None:
        target = _Side()
        target.other, self.other = self, target
        try:
            await asyncio.get_running_loop().create_connection(
                lambda: target, LOOPBACK, self.target_port
            )
        except OSError:
            if self.transport is not None:
                self.transport.close()


async def serve(listen_port: int, target_port: int) -> None:
    """Relay every connection to ``listen_port`` to ``target_port``, until cancelled."""
    dials: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _Accepted(target_port, dials), LOOPBACK, listen_port, reuse_address=True
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    listen_port, target_port = (int(arg) for arg in sys.argv[1:3])
    uvloop.run(serve(listen_port, target_port))


if __name__ == "__main__":
    main()
