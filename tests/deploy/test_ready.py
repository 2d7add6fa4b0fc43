"""The readiness check pins the certificate made for the node: another one is refused at once."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from homeport.exitnode.errors import ExitNodeError
from homeport.exitnode.ready import PinMismatchError, wait_until_serving
from tests.support.ports import free_port
from tests.support.processes import Process, homeport

pytestmark = pytest.mark.e2e  # real processes on 127.0.0.1

FINGERPRINT = r"control channel TLS certificate fingerprint: (sha256:[0-9a-f]{64})"


@pytest.fixture
def exit_server(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A real exit server with its own self-signed certificate: (control port, fingerprint)."""
    control_port = free_port()
    server = Process(
        "server",
        homeport(
            "server",
            *("--bind", "127.0.0.1", "--port", "0", "--control-port", str(control_port)),
            *("--token-hash", "ab" * 32, "--auto-tls", "--data-dir", str(tmp_path)),
        ),
    ).start()
    try:
        fingerprint = server.wait_for(FINGERPRINT, timeout=30).group(1)
        yield control_port, fingerprint
    finally:
        server.stop()


async def test_the_check_passes_with_the_right_certificate(exit_server: tuple[int, str]) -> None:
    control_port, fingerprint = exit_server
    await wait_until_serving("127.0.0.1", control_port, fingerprint, time.monotonic() + 20, 0.05)


async def test_another_certificate_is_refused_at_once(exit_server: tuple[int, str]) -> None:
    control_port, _ = exit_server
    started = time.monotonic()

    with pytest.raises(PinMismatchError, match=r"something else answers on .* is not the pinned"):
        await wait_until_serving(
            "127.0.0.1", control_port, "sha256:" + "0" * 64, started + 20, 0.05
        )

    assert time.monotonic() - started < 10


async def test_nothing_listening_times_out_with_a_hint() -> None:
    with socket.socket() as bound_not_listening:  # refuses connections; nobody else gets it
        bound_not_listening.bind(("127.0.0.1", 0))
        port = bound_not_listening.getsockname()[1]
        await expect_no_answer(port)


async def expect_no_answer(port: int) -> None:
    with pytest.raises(ExitNodeError, match=r"did not answer on https://127\.0\.0\.1:"):
        await wait_until_serving(
            "127.0.0.1", port, "sha256:" + "0" * 64, time.monotonic() + 0.3, 0.05
        )
