"""``python -m bench.tls_cost``: what TLS costs one side of a connection in Python.

No tunnel: a sender and a receiver process (forked) on 127.0.0.1 move
``--gib`` GiB in 256 KiB writes, and each reports its CPU seconds (user +
system) per GiB. Three ways, taking turns for ``--rounds`` rounds:

- ``plain``: uvloop transports over TCP, the receiver reading into a
  buffer of its own (``asyncio.BufferedProtocol``), as homeport's websocket;
- ``uvloop TLS``: the same over TLS 1.3, uvloop's TLS transport (OpenSSL
  working on memory BIOs that the transport fills and drains), as homeport's
  control channel over ``wss://``, with the cipher OpenSSL picks first
  (AES-256-GCM);
- ``uvloop ChaCha20``: the same with ChaCha20-Poly1305, which a homeport
  client on a CPU with no AES instructions asks for (``tunnel.tls``). Run
  with ``OPENSSL_ia32cap=~0x200000000000000`` (OpenSSL then ignores x86's
  AES-NI) to see what such a CPU, a Raspberry Pi 4's, spends on each;
- ``SSLSocket``: blocking ``ssl.SSLSocket`` calls with no event loop at all,
  OpenSSL reading and writing the socket itself: the least a TLS transport
  of our own could spend.

docs/performance.md reads the difference between the first two as what TLS
adds to each side of the tunnel, and the last as what a different TLS
transport could save of it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import socket
import ssl
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, NoReturn

import uvloop

from bench.processes import LOOPBACK
from tunnel.tls import client_context, ensure_self_signed, server_context

WRITE_BYTES: Final = 256 * 1024
READ_BUFFER_BYTES: Final = 1024 * 1024
WRITE_BUFFER_HIGH_BYTES: Final = 1024 * 1024
MODES: Final = ("plain", "uvloop TLS", "uvloop ChaCha20", "SSLSocket")
#: The cipher each TLS mode must have agreed on (checked on every transfer).
EXPECTED_CIPHER: Final = {
    "uvloop TLS": "TLS_AES_256_GCM_SHA384",
    "uvloop ChaCha20": "TLS_CHACHA20_POLY1305_SHA256",
    "SSLSocket": "TLS_AES_256_GCM_SHA384",
}


@dataclass(slots=True)
class Transfer:
    """One transfer: each side's CPU seconds and the wall time."""

    mode: str
    total_bytes: int
    sender_cpu_s: float
    receiver_cpu_s: float
    wall_s: float

    def per_gib(self, cpu_s: float) -> float:
        return cpu_s / (self.total_bytes / 2**30)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the transfers, print each mode's median round; return the status."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.tls_cost", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--gib", type=float, default=2.0, help="GiB per transfer (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="transfers per mode (default 3)")
    args = parser.parse_args(argv)
    total = int(args.gib * 2**30) // WRITE_BYTES * WRITE_BYTES
    if total <= 0 or args.rounds < 1:
        parser.error("--gib must cover one 256 KiB write and --rounds be at least 1")
    results: dict[str, list[Transfer]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="homeport-tls-cost-") as workdir:
        contexts = make_contexts(Path(workdir))
        for _ in range(args.rounds):
            for mode in MODES:
                results[mode].append(measure(mode, total, contexts))
    print(f"{args.gib:g} GiB per transfer in 256 KiB writes, median of {args.rounds}")
    print(f"{'mode':<16} {'MiB/s':>7} {'sender CPU-s/GiB':>17} {'receiver CPU-s/GiB':>19}")
    for mode, transfers in results.items():
        rate = statistics.median(t.total_bytes / 2**20 / t.wall_s for t in transfers)
        sender = statistics.median(t.per_gib(t.sender_cpu_s) for t in transfers)
        receiver = statistics.median(t.per_gib(t.receiver_cpu_s) for t in transfers)
        print(f"{mode:<16} {rate:>7,.0f} {sender:>17.2f} {receiver:>19.2f}")
    return 0


@dataclass(frozen=True, slots=True)
class Contexts:
    """The receiver's server context and a sender's client context per TLS mode."""

    server: ssl.SSLContext
    clients: dict[str, ssl.SSLContext]


def make_contexts(workdir: Path) -> Contexts:
    """A server context on a fresh self-signed certificate, and clients pinning nothing.

    The server as on a machine with AES instructions: AES-GCM unless the
    client asks for ChaCha20 first, as the ChaCha20 mode's client does.
    """
    ensure_self_signed(workdir, [LOOPBACK])
    server = server_context(workdir / "tls.crt", workdir / "tls.key", aes_hardware=True)
    # The pinned mode verifies nothing by itself.
    aes = client_context(pinned=True, aes_hardware=True)
    chacha20 = client_context(pinned=True, aes_hardware=False)
    clients = {"uvloop TLS": aes, "uvloop ChaCha20": chacha20, "SSLSocket": aes}
    return Contexts(server, clients)


def measure(mode: str, total: int, contexts: Contexts) -> Transfer:
    """One transfer of ``total`` bytes in ``mode``; the receiver runs in a forked child."""
    server, client = contexts.server, contexts.clients.get(mode)
    sender_sock, receiver_sock = _tcp_pair()
    read_end, write_end = os.pipe()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        sender_sock.close()
        _be_the_receiver(mode, receiver_sock, server, total, write_end)
    os.close(write_end)
    receiver_sock.close()
    cpu = time.process_time()
    # The sender closes only once the receiver has reported: closing a socket
    # with unread bytes (TLS 1.3 session tickets) resets the connection.
    try:
        with os.fdopen(read_end, "rb") as report:
            if mode == "SSLSocket":
                assert client is not None
                sock = client.wrap_socket(sender_sock, server_hostname=LOOPBACK)
                _check_cipher(mode, sock.cipher())
                _send_blocking(sock, total, report)
            else:
                uvloop.run(_send(sender_sock, client, total, report, mode))
            sender_cpu = time.process_time() - cpu
            received = report.read()
    finally:
        sender_sock.close()  # a receiver still waiting sees the end
        _, status = os.waitpid(pid, 0)
    if status != 0 or not received:
        raise RuntimeError(f"the {mode} receiver failed (wait status {status})")
    return Transfer(mode, total, sender_cpu, float(received), time.perf_counter() - started)


def _be_the_receiver(
    mode: str, sock: socket.socket, server: ssl.SSLContext, total: int, report_fd: int
) -> NoReturn:
    """Receive ``total`` bytes, write this process's CPU seconds to ``report_fd``, and exit."""
    status = 1
    try:
        cpu = time.process_time()

        def report() -> None:
            os.write(report_fd, repr(time.process_time() - cpu).encode())

        if mode == "SSLSocket":
            _receive_blocking(server.wrap_socket(sock, server_side=True), total, report)
        else:
            tls = server if mode in EXPECTED_CIPHER else None
            uvloop.run(_receive(sock, tls, total, report))
        status = 0
    except BaseException:  # noqa: BLE001 -- whatever it is, told before the child exits
        traceback.print_exc()
    finally:
        os._exit(status)  # never back into the parent's code, whatever happened


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        sender = socket.create_connection(listener.getsockname())
        receiver, _ = listener.accept()
    for sock in (sender, receiver):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sender, receiver


class _Counting(asyncio.BufferedProtocol):
    """Reads into one buffer of its own and counts; done when ``total`` bytes came."""

    def __init__(self, total: int, done: asyncio.Future[None]) -> None:
        self._buffer = memoryview(bytearray(READ_BUFFER_BYTES))
        self._left = total
        self._done = done
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._left -= nbytes
        if self._left <= 0 and not self._done.done():
            self._done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_exception(ConnectionError(f"closed with {self._left} bytes to come"))
        self.closed.set_result(None)


class _Paced(asyncio.Protocol):
    """Tells the sender when the transport's buffer has room."""

    def __init__(self) -> None:
        self.room: asyncio.Event = asyncio.Event()
        self.room.set()
        self.lost: Exception | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def pause_writing(self) -> None:
        self.room.clear()

    def resume_writing(self) -> None:
        self.room.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError("closed by the receiver")
        self.room.set()
        self.closed.set_result(None)


async def _receive(
    sock: socket.socket, tls: ssl.SSLContext | None, total: int, report: Callable[[], None]
) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    protocol = _Counting(total, done)  # uvloop returns its TLS protocol, not ours
    transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock, ssl=tls)
    try:
        await done
        report()  # before the connection goes: its teardown is not the transfer's
    finally:
        await _abort(transport, protocol.closed)


async def _send(
    sock: socket.socket, tls: ssl.SSLContext | None, total: int, report: BinaryIO, mode: str
) -> None:
    loop = asyncio.get_running_loop()
    protocol = _Paced()
    transport, _ = await loop.create_connection(
        lambda: protocol, sock=sock, ssl=tls, server_hostname=LOOPBACK if tls else None
    )
    try:
        if tls is not None:
            _check_cipher(mode, transport.get_extra_info("cipher"))
        transport.set_write_buffer_limits(WRITE_BUFFER_HIGH_BYTES)
        chunk = os.urandom(WRITE_BYTES)
        for _ in range(total // WRITE_BYTES):
            await protocol.room.wait()
            if protocol.lost is not None:
                raise protocol.lost
            transport.write(chunk)
        await _readable(report)
    finally:
        await _abort(transport, protocol.closed)


def _check_cipher(mode: str, cipher: tuple[str, str, int] | None) -> None:
    """Refuse to measure a mode whose handshake agreed on another cipher than its own."""
    if cipher is None or cipher[0] != EXPECTED_CIPHER[mode]:
        raise RuntimeError(f"the {mode} handshake agreed on {cipher}, not {EXPECTED_CIPHER[mode]}")


async def _readable(file: BinaryIO) -> None:
    """Wait until ``file`` has something to read (or its writer closed it)."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(file.fileno(), wake)
    try:
        await readable
    finally:
        loop.remove_reader(file.fileno())


async def _abort(transport: asyncio.Transport, closed: asyncio.Future[None]) -> None:
    """Drop the connection and wait until the transport let go of it.

    Aborting, not closing: every byte has been counted by then, and a TLS
    shutdown waits for the peer's close_notify, which a peer that has gone
    (or is itself waiting) never sends. Waiting for ``connection_lost``
    leaves nothing of the transport for the loop to find when it closes.
    """
    transport.abort()
    await closed


def _receive_blocking(sock: ssl.SSLSocket, total: int, report: Callable[[], None]) -> None:
    buffer = memoryview(bytearray(READ_BUFFER_BYTES))
    left = total
    with sock:
        while left > 0:
            nbytes = sock.recv_into(buffer)
            if not nbytes:
                raise ConnectionError(f"closed with {left} bytes to come")
            left -= nbytes
        report()


def _send_blocking(sock: ssl.SSLSocket, total: int, report: BinaryIO) -> None:
    chunk = os.urandom(WRITE_BYTES)
    with sock:
        for _ in range(total // WRITE_BYTES):
            sock.sendall(chunk)
        select.select([report], [], [])


if __name__ == "__main__":
    sys.exit(main())
