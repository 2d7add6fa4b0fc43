"""What a Pi meets at boot after a power cut, against real processes (docs/security.md).

With no clock of its own it may start with its clock behind, so that the exit
server's certificate is not yet valid (E6); its network or DNS may not be up,
so that the exit server's name does not resolve (E7). Neither is fatal: the
client says what is wrong, keeps retrying, and connects once it can.
"""

from __future__ import annotations

import asyncio
import datetime
import re
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.e2e.conftest import CONNECTED, ClientProcess, ExitServerProcess, Processes, Upstream
from tests.support.processes import Process, homeport
from tunnel.tls import self_signed

NOT_YET_VALID = (
    r"TLS certificate rejected: certificate is not yet valid; "
    r"is this machine's clock wrong \(a Pi with no clock after a power cut\)\?$"
)
RECONNECTING = r"reconnecting in \d+\.\d s$"


def line_index(process: Process, pattern: str, since: int = 0) -> int:
    """The index of the first line of output from ``since`` on that matches ``pattern``."""
    for index, line in enumerate(process.lines[since:], start=since):
        if re.search(pattern, line):
            return index
    raise AssertionError(f"{process.name}: no line matching {pattern!r}:\n{process.output}")


def certificate_valid_from(directory: Path, ahead: float) -> tuple[Path, Path, float]:
    """A self-signed certificate for 127.0.0.1 and localhost that is valid only in the future.

    Its notBefore lies ``ahead`` to ``ahead + 1`` seconds from now (X.509
    times are whole seconds); returns the certificate's and key's paths and
    that time (seconds since the epoch).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    not_before = (now + datetime.timedelta(seconds=ahead + 1)).replace(microsecond=0)
    certificate = self_signed(key, ["127.0.0.1", "localhost"], valid_from=not_before)
    directory.mkdir()
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path, certificate.not_valid_before_utc.timestamp()


@pytest.mark.timeout(60)
async def test_e6_a_certificate_not_yet_valid_is_retried_with_a_clock_hint_until_it_is(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    upstream: Upstream,
    tmp_path: Path,
) -> None:
    # The Pi's clock is behind the exit server's certificate: here the
    # certificate is ahead of the clock instead, by about 4 s. Not pinned:
    # a pinned certificate's dates are never checked.
    cert, key, not_before = certificate_valid_from(tmp_path / "pki", ahead=3.5)
    server = start_server("--tls-cert", str(cert), "--tls-key", str(key))
    client = start_client(
        server,
        upstream.url,
        url=f"wss://127.0.0.1:{server.control_port}",
        flags=("--ca-file", str(cert), "--reconnect-max-delay", "1"),
        wait=False,
    )
    output = client.process
    first = await output.wait_for_async(f"{NOT_YET_VALID}|{CONNECTED}", within=10)
    assert re.search(NOT_YET_VALID, first.group(0)), (
        f"the first attempt came after the certificate became valid ({not_before:.0f}, "
        f"now {time.time():.1f}): processes this slow to start leave nothing to test"
    )
    hint = line_index(output, NOT_YET_VALID)
    await output.wait_for_async(RECONNECTING, within=5, since=hint + 1)
    assert output.running()

    # It connects by itself once the certificate is valid (retrying every 1 s).
    within = max(0.0, not_before - time.time()) + 15
    await output.wait_for_async(CONNECTED, within=within, since=hint + 1)
    assert time.time() >= not_before
    connected = line_index(output, CONNECTED)
    warnings = [line for line in output.lines[:connected] if " WARNING " in line]
    assert warnings, output.output
    assert all(re.search(NOT_YET_VALID, line) for line in warnings), warnings
    assert not any(re.search(NOT_YET_VALID, line) for line in output.lines[connected:])
    assert output.running()

    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        http.get(f"{server.url}/") as response,
    ):
        assert (response.status, await response.read()) == (200, b"hello from upstream\n")


async def resolver_failure(host: str) -> str:
    """What this machine's resolver says of ``host``, as the client would log it."""
    try:
        async with asyncio.timeout(5):
            await asyncio.get_running_loop().getaddrinfo(host, 8123, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return exc.strerror or str(exc)
    except TimeoutError:
        pytest.skip(f"this machine's resolver takes over 5 s to fail on {host}")
    pytest.skip(f"this machine's resolver answers for {host} (RFC 6761: it must not)")


@pytest.mark.timeout(60)
async def test_e7_an_exit_host_that_does_not_resolve_is_retried_until_stopped(
    processes: Processes, token_file: Path, upstream: Upstream
) -> None:
    # The Pi's network (or DNS) is not up yet at boot. The .invalid TLD never
    # resolves (RFC 6761). wss://, as deployed: ws:// to a host that is not
    # this machine is refused at start without --insecure.
    failure = await resolver_failure("exit.invalid")
    client = processes.start(
        "client-pi",
        homeport(
            "client",
            "--url", "wss://exit.invalid:8123",
            "--token-file", str(token_file),
            "--name", "pi",
            "--reconnect-max-delay", "1",
            "--upstream", upstream.url,
        ),
    )  # fmt: skip
    cannot_resolve = rf"cannot reach wss://exit\.invalid:8123/connect: {re.escape(failure)}$"
    since = 0
    for _ in range(3):  # the first attempt and two retries, each failed and rescheduled
        await client.wait_for_async(cannot_resolve, within=10, since=since)
        since = line_index(client, cannot_resolve, since) + 1
        await client.wait_for_async(RECONNECTING, within=5, since=since)
        since = line_index(client, RECONNECTING, since) + 1
    assert client.running()
    assert "Traceback" not in client.output
    assert " ERROR " not in client.output

    client.send_signal(signal.SIGTERM)
    assert await client.wait_async(15) == 0
    assert client.lines[-1].endswith("client stopped"), client.output
