"""A raw TCP upstream for the exit server's TCP ports, run as its own process.

    python -m tests.support.tcp_upstream

prints ``tcp upstream listening on 127.0.0.1:PORT`` once it serves. On each
connection it speaks first, ``hello\\n`` (as SSH and SMTP servers do), then
echoes every byte it reads; when the visitor half-closes it sends ``got N
bytes, sha256 HEX\\n`` and closes. A read that ends with ``reset me\\n``
is not echoed: the upstream resets the connection instead (SO_LINGER 0).
Each connection's end is a line, ``tcp connection ended after N bytes
(closed)`` (``(reset)`` when the visitor's side reset it, ``(reset by
us)``), that tests wait on.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
import sys

GREETING = b"hello\n"
RESET_ME = b"reset me\n"
_LINGER_NONE = struct.pack("ii", 1, 0)


def say(line: str) -> None:
    print(line, flush=True)  # noqa: T201 - tests wait on these lines


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    digest = hashlib.sha256()
    count = 0
    how = "closed"
    try:
        writer.write(GREETING)
        while data := await reader.read(65536):
            count += len(data)
            if data.endswith(RESET_ME):
                writer.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_NONE
                )
                writer.transport.abort()
                how = "reset by us"
                return
            digest.update(data)
            writer.write(data)
            await writer.drain()
        writer.write(f"got {count} bytes, sha256 {digest.hexdigest()}\n".encode())
        await writer.drain()
    except ConnectionError:
        how = "reset"
    finally:
        writer.close()
        say(f"tcp connection ended after {count} bytes ({how})")


async def main() -> None:
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    say(f"tcp upstream listening on 127.0.0.1:{port}")
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
