"""sd_notify without libsystemd: READY=1, the watchdog's pings, and silence outside systemd."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tunnel.systemd import Notifier


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify"))
    listener.setblocking(False)
    yield listener
    listener.close()


async def received(listener: socket.socket, count: int) -> list[tuple[bytes, float]]:
    """The next ``count`` messages, each with the time it arrived."""
    loop = asyncio.get_running_loop()
    messages = []
    async with asyncio.timeout(5):
        while len(messages) < count:
            messages.append((await loop.sock_recv(listener, 4096), time.monotonic()))
    return messages


async def test_ready_comes_first_then_the_watchdog_is_pinged_at_half_its_interval(
    notify_socket: socket.socket,
) -> None:
    notifier = Notifier(
        {
            "NOTIFY_SOCKET": notify_socket.getsockname(),
            "WATCHDOG_USEC": "200000",
            "WATCHDOG_PID": str(os.getpid()),
        }
    )
    assert notifier.watchdog_interval_s == pytest.approx(0.1)
    started = time.monotonic()
    notifier.ready()
    messages = await received(notify_socket, 4)
    notifier.close()
    assert [text for text, _ in messages] == [b"READY=1"] + [b"WATCHDOG=1"] * 3
    assert messages[-1][1] - started >= 0.19  # the third ping, two intervals after the first


async def test_an_abstract_notify_socket_is_reached_by_its_at_sign_name() -> None:
    name = f"homeport-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.setblocking(False)
        Notifier({"NOTIFY_SOCKET": "@" + name}).notify("STOPPING=1")
        assert listener.recv(4096) == b"STOPPING=1"


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"WATCHDOG_USEC": "100000"},
        {"NOTIFY_SOCKET": "/nonexistent/notify", "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"},
        {"NOTIFY_SOCKET": "/nonexistent/notify", "WATCHDOG_USEC": "soon"},
    ],
    ids=["outside systemd", "no socket", "another process's watchdog", "a bad interval"],
)
def test_no_watchdog_unless_systemd_set_one_for_this_process(environ: dict[str, str]) -> None:
    assert Notifier(environ).watchdog_interval_s is None


def test_a_notify_socket_that_is_gone_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    Notifier({"NOTIFY_SOCKET": "/nonexistent/notify"}).notify("READY=1")
    assert "could not notify systemd (READY=1)" in caplog.text
