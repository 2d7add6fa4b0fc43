"""Bulk TCP transfers between two namespaces: the yardstick for the tunnel over a bad link.

    python -m tests.topology.bulk sink PORT
    python -m tests.topology.bulk send HOST PORT --bytes N --count K

The sink accepts connections and, on each, reads transfers framed as an
8-byte big-endian length and that many bytes, answering one byte when a
transfer has arrived whole. It prints ``sink up`` once it listens.

The sender opens one connection and makes ``--count`` transfers of
``--bytes`` in a row on it, each timed from its first byte written to the
sink's answer, then prints one JSON line: ``{"mbit_s": [...]}``. One
long-lived connection carrying transfers one after another is the shape of
the tunnel's control connection carrying downloads, so the two can be
compared over the same link.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import time
from typing import Final

_LENGTH: Final = struct.Struct("!Q")
_CHUNK_BYTES: Final = 1 << 20


def _read_exactly(connection: socket.socket, length: int) -> bool:
    """Read and drop ``length`` bytes; False if the peer closed first."""
    while length:
        chunk = connection.recv(min(_CHUNK_BYTES, length))
        if not chunk:
            return False
        length -= len(chunk)
    return True


def _read_head(connection: socket.socket) -> int | None:
    head = b""
    while len(head) < _LENGTH.size:
        chunk = connection.recv(_LENGTH.size - len(head))
        if not chunk:
            return None
        head += chunk
    (length,) = _LENGTH.unpack(head)
    return int(length)


def sink(port: int) -> None:
    listener = socket.create_server(("0.0.0.0", port), reuse_port=False)
    print("sink up", flush=True)  # noqa: T201 - the test waits on this line
    while True:
        connection, _ = listener.accept()
        with connection:
            while (length := _read_head(connection)) is not None:
                if not _read_exactly(connection, length):
                    break
                connection.sendall(b"k")


def send(host: str, port: int, size: int, count: int) -> list[float]:
    """Make ``count`` transfers of ``size`` bytes on one connection; their rates in Mbit/s."""
    payload = bytes(size)
    rates = []
    with socket.create_connection((host, port), timeout=300) as connection:
        for _ in range(count):
            started = time.monotonic()
            connection.sendall(_LENGTH.pack(size) + payload)
            if connection.recv(1) != b"k":
                raise ConnectionError("the sink closed before answering")
            rates.append(size * 8 / 1e6 / (time.monotonic() - started))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    sink_mode = modes.add_parser("sink")
    sink_mode.add_argument("port", type=int)
    send_mode = modes.add_parser("send")
    send_mode.add_argument("host")
    send_mode.add_argument("port", type=int)
    send_mode.add_argument("--bytes", type=int, required=True)
    send_mode.add_argument("--count", type=int, default=1)
    args = parser.parse_args()
    if args.mode == "sink":
        sink(args.port)
    else:
        rates = send(args.host, args.port, args.bytes, args.count)
        print(json.dumps({"mbit_s": rates}), flush=True)  # noqa: T201 - the test reads this line


if __name__ == "__main__":
    main()
