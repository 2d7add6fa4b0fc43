"""A bad link made in user space, for kernels built without ``tc netem``.

    python -m tests.topology.delayline NETNS_A DEV_A NETNS_B DEV_B \
        --delay-ms 100 --jitter-ms 20 --loss 0.01

opens a TUN device named DEV_A in network namespace NETNS_A and one named
DEV_B in NETNS_B, and carries every IP packet that one side sends to the
other, as netem would: each packet is dropped with probability ``--loss``,
otherwise delivered after ``delay ± jitter`` (uniform, each packet drawn
independently, so jitter reorders packets as netem's does). Both directions
get the same treatment. It prints ``delay line up`` once both devices exist;
the devices vanish, and routes through them with them, when it exits.

The test bed routes the Pi's traffic over this pair instead of its veth
uplink while the line is up (tests/topology/bed.py, ``TestBed.impair``).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import fcntl
import os
import random
import signal
import struct
import sys
from typing import Final

TUNSETIFF: Final = 0x400454CA
IFF_TUN: Final = 0x0001
IFF_NO_PI: Final = 0x1000
CLONE_NEWNET: Final = 0x40000000
MAX_PACKET_BYTES: Final = 65_536


def say(line: str) -> None:
    print(line, flush=True)  # noqa: T201 - the test waits on these lines


def enter_netns(name: str) -> None:
    """Move this (single-threaded) process into the named network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns into {name}: {os.strerror(error)}")
    finally:
        os.close(fd)


def open_tun(name: str) -> int:
    """Create a TUN device (IP packets, no extra header) and return its descriptor."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class DelayLine:
    """Carries packets between two TUN descriptors with delay, jitter and loss."""

    def __init__(self, delay_s: float, jitter_s: float, loss: float, rng: random.Random) -> None:
        self.delay_s = delay_s
        self.jitter_s = jitter_s
        self.loss = loss
        self.rng = rng
        self.carried = 0
        self.dropped = 0

    def connect(self, loop: asyncio.AbstractEventLoop, source: int, sink: int) -> None:
        loop.add_reader(source, self._read, loop, source, sink)

    def _read(self, loop: asyncio.AbstractEventLoop, source: int, sink: int) -> None:
        while True:
            try:
                packet = os.read(source, MAX_PACKET_BYTES)
            except BlockingIOError:
                return
            if self.rng.random() < self.loss:
                self.dropped += 1
                continue
            delay = self.delay_s + self.rng.uniform(-self.jitter_s, self.jitter_s)
            loop.call_later(max(0.0, delay), self._deliver, sink, packet)

    def _deliver(self, sink: int, packet: bytes) -> None:
        try:
            os.write(sink, packet)
            self.carried += 1
        except OSError:  # the device is going away, or its queue is full: a lost packet
            self.dropped += 1


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("netns_a")
    parser.add_argument("dev_a")
    parser.add_argument("netns_b")
    parser.add_argument("dev_b")
    parser.add_argument("--delay-ms", type=float, default=100.0)
    parser.add_argument("--jitter-ms", type=float, default=20.0)
    parser.add_argument("--loss", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()

    enter_netns(args.netns_a)
    fd_a = open_tun(args.dev_a)
    enter_netns(args.netns_b)
    fd_b = open_tun(args.dev_b)

    line = DelayLine(
        args.delay_ms / 1000, args.jitter_ms / 1000, args.loss, random.Random(args.seed)
    )
    loop = asyncio.get_running_loop()
    line.connect(loop, fd_a, fd_b)
    line.connect(loop, fd_b, fd_a)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    say(f"delay line up: {args.dev_a} in {args.netns_a} <-> {args.dev_b} in {args.netns_b}")
    await stop.wait()
    say(f"delay line down: {line.carried} packets carried, {line.dropped} dropped")


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
