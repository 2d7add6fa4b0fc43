"""HTTPS on the public port: a certificate from a real ACME CA (Pebble), or from files.

Pebble validates for real: it resolves the name through its mock DNS (every
name is 127.0.0.1 unless a test says otherwise) and fetches the HTTP-01
answer from the exit server's public HTTP port. Visitors then connect over
TLS with the name in SNI, trusting only Pebble's root, as a browser trusts
Let's Encrypt's.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from server.certificates import store_dir
from tests.e2e.conftest import (
    ClientProcess,
    ExitServerProcess,
    Processes,
    Upstream,
    scrape_metrics,
)
from tests.support.certificates import as_der, certificate, write_pair
from tests.support.pebble import Pebble, start_pebble
from tests.support.ports import free_port
from tests.support.processes import refused_setting

NAME = "fn.homeport.test"
HTTPS_READY = r"HTTPS on https://127\.0\.0\.1:(\d+)/"
ISSUED = r"HTTPS certificate \(new\) for "
TIMEOUT_S = 30.0


@dataclass
class HttpsServer:
    server: ExitServerProcess
    https_port: int
    data_dir: Path


@pytest.fixture
def pebble_port() -> int:
    """The exit server's public HTTP port, where Pebble looks for the HTTP-01 answers."""
    return free_port()


@pytest.fixture
def pebble(processes: Processes, tmp_path: Path, pebble_port: int) -> Pebble:
    return start_pebble(processes, tmp_path / "pebble", pebble_port)


@pytest.fixture
def start_acme_server(
    start_server: Callable[..., ExitServerProcess],
    pebble: Pebble,
    pebble_port: int,
    tmp_path: Path,
) -> Callable[..., HttpsServer]:
    def start(
        *names: str, data_dir: Path | None = None, flags: tuple[str, ...] = ()
    ) -> HttpsServer:
        data_dir = data_dir or tmp_path / "data"
        domains = [f"--letsencrypt-domain={name}" for name in names or (NAME,)]
        server = start_server(
            *domains,
            *flags,
            "--letsencrypt-email", "owner@homeport.test",
            "--acme-directory", pebble.directory,
            "--acme-ca-file", str(pebble.ca_file),
            "--https-port", "0",
            "--data-dir", str(data_dir),
            port=pebble_port,
        )  # fmt: skip
        https_port = int(server.process.wait_for(HTTPS_READY).group(1))
        return HttpsServer(server, https_port, data_dir)

    return start


def trusting(root_pem: str) -> ssl.SSLContext:
    """A visitor's TLS context that trusts only ``root_pem``."""
    context = ssl.create_default_context(cadata=root_pem)
    return context


async def served_certificate(port: int, name: str, context: ssl.SSLContext) -> bytes:
    """The certificate the HTTPS port presents for ``name`` (verified by ``context``): DER."""
    _, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=name), TIMEOUT_S
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        assert der is not None
        return bytes(der)
    finally:
        writer.close()


async def get_json(port: int, name: str, context: ssl.SSLContext, path: str) -> dict[str, object]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"https://127.0.0.1:{port}{path}",
            ssl=context,
            server_hostname=name,
            headers={"Host": name},
            timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
        ) as response,
    ):
        assert response.status == 200, await response.text()
        return dict(json.loads(await response.read()))


async def test_a_certificate_from_the_acme_ca_serves_visitors_over_https_through_the_tunnel(
    start_acme_server: Callable[..., HttpsServer],
    start_client: Callable[..., ClientProcess],
    upstream: Upstream,
    pebble: Pebble,
    token: str,
) -> None:
    https = start_acme_server()
    start_client(https.server, upstream.url)
    await https.server.process.wait_for_async(ISSUED + NAME, within=TIMEOUT_S)
    context = trusting(pebble.root_pem())
    answer = await get_json(https.https_port, NAME, context, "/inspect")
    headers = {k.lower(): v for k, v in answer["headers"]}  # type: ignore[attr-defined]
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-host"] == NAME
    der = await served_certificate(https.https_port, NAME, context)
    served = x509.load_der_x509_certificate(der)
    names = served.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == [NAME]
    # Its end is in the metrics, to alert on, and in the status.
    metrics = await scrape_metrics(https.server, token)
    expiry = metrics[("homeport_https_certificate_expiry_timestamp_seconds", "")]
    assert expiry == served.not_valid_after_utc.timestamp()
    assert metrics[("homeport_acme_order_failures_total", "")] == 0
    # Plain HTTP is still served, and says so to the upstream.
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{https.server.url}/inspect", headers={"Host": NAME}) as response,
    ):
        plain = {k.lower(): v for k, v in (await response.json())["headers"]}
    assert plain["x-forwarded-proto"] == "http"


async def test_one_certificate_names_every_domain_and_each_is_validated(
    start_acme_server: Callable[..., HttpsServer],
    pebble: Pebble,
) -> None:
    names = ("fn.homeport.test", "www.homeport.test")
    # With every plain HTTP request redirected, but for the CA's challenges.
    https = start_acme_server(*names, flags=("--https-redirect",))
    await https.server.process.wait_for_async(ISSUED, within=TIMEOUT_S)
    context = trusting(pebble.root_pem())
    for name in names:
        der = await served_certificate(https.https_port, name, context)
        certified = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
        assert sorted(certified.value.get_values_for_type(x509.DNSName)) == sorted(names)
    # Pebble fetched one answer per name from the exit server's HTTP port.
    log = https.server.process.output
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{https.server.url}/", headers={"Host": names[1]}, allow_redirects=False
        ) as response,
    ):
        assert response.status == 308
        assert response.headers["Location"] == f"https://{names[1]}:{https.https_port}/"
    for name in names:
        assert f"answering the CA's HTTP-01 challenge for {name}" in log


async def test_after_a_restart_the_kept_certificate_is_served_and_not_ordered_again(
    start_acme_server: Callable[..., HttpsServer],
    pebble: Pebble,
    tmp_path: Path,
) -> None:
    first = start_acme_server()
    await first.server.process.wait_for_async(ISSUED + NAME, within=TIMEOUT_S)
    context = trusting(pebble.root_pem())
    before = await served_certificate(first.https_port, NAME, context)
    assert first.server.process.stop() == 0
    again = start_acme_server(data_dir=first.data_dir)
    # Served from the first handshake on, before the child has even reported.
    assert await served_certificate(again.https_port, NAME, context) == before
    await again.server.process.wait_for_async(r"HTTPS certificate \(kept\) for ", within=TIMEOUT_S)
    assert "answering the CA's HTTP-01 challenge" not in again.server.process.output


def _certificate_due_for_renewal(store: Path) -> bytes:
    """A certificate for NAME two thirds and more through its life, as if issued long ago: DER."""
    cert, key = certificate([NAME], age_days=70, life_days=90)
    write_pair(store, cert, key)
    return as_der(cert)


async def test_a_certificate_due_for_renewal_is_served_until_its_successor_replaces_it(
    start_acme_server: Callable[..., HttpsServer],
    pebble: Pebble,
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    old = _certificate_due_for_renewal(store_dir(data_dir, pebble.directory))
    https = start_acme_server(data_dir=data_dir)
    await https.server.process.wait_for_async(ISSUED + NAME, within=TIMEOUT_S)
    context = trusting(pebble.root_pem())  # the old one is self-signed: this fails on it
    new = await served_certificate(https.https_port, NAME, context)
    assert hashlib.sha256(new).digest() != hashlib.sha256(old).digest()


async def test_a_failed_validation_is_logged_with_the_cas_reason_and_http_goes_on(
    start_acme_server: Callable[..., HttpsServer],
    start_client: Callable[..., ClientProcess],
    upstream: Upstream,
    pebble: Pebble,
) -> None:
    name = "unreachable.homeport.test"
    pebble.resolve(name, "127.0.0.9")  # nothing of ours listens there
    https = start_acme_server(name)
    start_client(https.server, upstream.url)
    process = https.server.process
    await process.wait_for_async(
        r"acme: validation failed: unreachable\.homeport\.test: .*127\.0\.0\.9.*refused",
        within=TIMEOUT_S,
    )
    await process.wait_for_async(r"no HTTPS certificate from .* trying again in 10 min")
    # No certificate to present: the handshake fails, and nothing else does.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await served_certificate(https.https_port, name, ssl.create_default_context())
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{https.server.url}/inspect", headers={"Host": name}) as response,
    ):
        assert response.status == 200
    assert process.running()
    # The name fixed, SIGHUP checks at once rather than in 10 minutes.
    pebble.resolve(name, "127.0.0.1")
    process.send_signal(signal.SIGHUP)
    await process.wait_for_async(ISSUED + name, within=TIMEOUT_S)
    await served_certificate(https.https_port, name, trusting(pebble.root_pem()))


async def test_challenge_paths_are_answered_only_for_the_certified_names(
    start_acme_server: Callable[..., HttpsServer],
    start_client: Callable[..., ClientProcess],
    upstream: Upstream,
) -> None:
    https = start_acme_server()
    start_client(https.server, upstream.url)
    await https.server.process.wait_for_async(ISSUED + NAME, within=TIMEOUT_S)
    url = f"{https.server.url}/.well-known/acme-challenge/"
    async with aiohttp.ClientSession() as session:
        for token in ("unknown-token", "..%2F..%2Fetc%2Fpasswd", "a/b"):
            async with session.get(url + token, headers={"Host": NAME}) as response:
                assert response.status == 404
                assert await response.text() == "404 not found\n"  # ours, not the upstream's
        # Another host's challenges go through the tunnel (Caddy on the Pi gets its own).
        async with session.get(url + "x", headers={"Host": "other.homeport.test"}) as response:
            assert response.status == 404
            assert await response.text() == "404: Not Found"  # aiohttp's, the upstream's


# -- certificates from files -----------------------------------------------------------------


def _self_signed_files(directory: Path, name: str) -> tuple[Path, Path, bytes]:
    """A self-signed certificate for ``name`` and its key, written: their paths, and it (DER)."""
    cert, key = certificate([name])
    return (*write_pair(directory, cert, key), as_der(cert))


def _pinned(served: bytes) -> ssl.SSLContext:
    return trusting(ssl.DER_cert_to_PEM_cert(served))


async def test_a_certificate_from_files_is_served_and_loaded_again_on_sighup(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    upstream: Upstream,
    tmp_path: Path,
) -> None:
    cert, key, first = _self_signed_files(tmp_path / "tls", NAME)
    server = start_server("--https-cert", str(cert), "--https-key", str(key), "--https-port", "0")
    https_port = int(server.process.wait_for(HTTPS_READY).group(1))
    start_client(server, upstream.url)
    answer = await get_json(https_port, NAME, _pinned(first), "/inspect")
    assert answer["headers"]
    # certbot renews: new files, then SIGHUP (its deploy hook, or systemctl reload).
    _, _, second = _self_signed_files(tmp_path / "tls", NAME)
    mark = server.process.mark()
    server.process.send_signal(signal.SIGHUP)
    await server.process.wait_for_async(r"loaded again: asked to \(SIGHUP\)", since=mark)
    assert await served_certificate(https_port, NAME, _pinned(second)) == second
    # A broken renewal keeps the certificate that works.
    key.write_text("not a key\n")
    mark = server.process.mark()
    server.process.send_signal(signal.SIGHUP)
    await server.process.wait_for_async(r"still serving the certificate loaded before", since=mark)
    assert await served_certificate(https_port, NAME, _pinned(second)) == second
    assert server.process.running()


# -- bad options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--letsencrypt-domain", "*.homeport.test"], "a wildcard needs a DNS-01 challenge"),
        (["--letsencrypt-domain", "203.0.113.7"], "not IP addresses"),
        (["--letsencrypt-domain", "localhost"], "is not a DNS name a CA certifies"),
        (["--letsencrypt-domain", "fn_x.homeport.test"], "is not a DNS name a CA certifies"),
        (["--letsencrypt-domain", "-fn.homeport.test"], "is not a DNS name a CA certifies"),
        (["--letsencrypt-domain", "bücher.example"], "is not a DNS name a CA certifies"),
        (["--letsencrypt-domain", "a" * 64 + ".example"], "is not a DNS name a CA certifies"),
        (["--letsencrypt-domain", NAME, "--letsencrypt-email", "owner"], "not an email address"),
        (
            ["--letsencrypt-domain", NAME, "--acme-directory", "http://ca.example/dir"],
            "an ACME directory is an https:// URL",
        ),
        (["--letsencrypt-email", "owner@homeport.test"], "goes with --letsencrypt-domain"),
        (["--https-redirect"], "--https-redirect needs HTTPS"),
        (["--https-cert", "cert.pem"], "--https-cert and --https-key go together"),
        (
            ["--https-cert", "c.pem", "--https-key", "k.pem", "--letsencrypt-domain", NAME],
            "not both",
        ),
        (
            ["--letsencrypt-domain", NAME, "--https-port", "8123", "--control-port", "8123"],
            "--https-port 8123 is the --control-port already",
        ),
        (
            ["--letsencrypt-domain", NAME, "--https-port", "4443", "--tcp-port", "4443"],
            "--tcp-port 4443 is the --https-port already",
        ),
    ],
)
def test_bad_https_options_are_refused_with_a_clear_message(
    token_file: Path, tmp_path: Path, flags: list[str], message: str
) -> None:
    refusal = refused_setting(
        "server", "--token-file", str(token_file), "--data-dir", str(tmp_path), *flags
    )
    assert message in refusal


def test_certificate_files_that_are_not_a_pair_are_refused_at_start(
    token_file: Path, tmp_path: Path
) -> None:
    cert, _, _ = _self_signed_files(tmp_path / "one", NAME)
    _, key, _ = _self_signed_files(tmp_path / "two", NAME)
    refusal = refused_setting(
        "server", "--token-file", str(token_file), "--port", "0", "--control-port", "0",
        "--https-port", "0", "--https-cert", str(cert), "--https-key", str(key),
    )  # fmt: skip
    assert f"cannot load the HTTPS certificate {cert} with key {key}" in refusal


async def test_https_redirect_sends_plain_http_visitors_to_the_same_url_over_https(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    upstream: Upstream,
    tmp_path: Path,
) -> None:
    cert, key, _ = _self_signed_files(tmp_path / "tls", NAME)
    server = start_server(
        "--https-cert", str(cert), "--https-key", str(key), "--https-port", "0", "--https-redirect"
    )
    https_port = int(server.process.wait_for(HTTPS_READY).group(1))
    start_client(server, upstream.url)
    expected = f"https://{NAME}:{https_port}/inspect/a%20b?x=1&y"
    async with aiohttp.ClientSession() as session:
        for method in ("GET", "HEAD", "POST"):
            async with session.request(
                method,
                f"{server.url}/inspect/a%20b?x=1&y",
                headers={"Host": f"FN.homeport.test:{server.port}"},
                data=b"kept for the retry" if method == "POST" else None,
                allow_redirects=False,
            ) as response:
                assert response.status == 308  # method and body kept (RFC 9110)
                assert response.headers["Location"] == expected
                body = await response.read()
                assert body == (b"" if method == "HEAD" else f"308 moved to {expected}\n".encode())


async def _stalled_handshakes(
    port: int, count: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``count`` connections to ``port`` that never send their ClientHello."""
    return [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]


async def test_visitors_in_their_tls_handshake_count_under_the_limits_and_the_head_timeout(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    upstream: Upstream,
    tmp_path: Path,
    token: str,
) -> None:
    cert, key, der = _self_signed_files(tmp_path / "tls", NAME)
    server = start_server(
        "--https-cert", str(cert), "--https-key", str(key), "--https-port", "0",
        "--max-connections-per-address", "3", "--head-timeout", "2",
    )  # fmt: skip
    https_port = int(server.process.wait_for(HTTPS_READY).group(1))
    start_client(server, upstream.url)
    stalled = await _stalled_handshakes(https_port, 3)
    try:
        # A fourth connection from the same address is closed as it is accepted.
        reader, writer = await asyncio.open_connection("127.0.0.1", https_port)
        assert await asyncio.wait_for(reader.read(), TIMEOUT_S) == b""
        writer.close()
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await served_certificate(https_port, NAME, _pinned(der))
        metrics = await scrape_metrics(server, token)
        assert metrics["homeport_visitor_connections_refused_total", "limit=per_address"] == 2
        assert metrics["homeport_visitor_connections", "kind=http"] == 3
        # The head timeout ends a handshake that never comes, and frees its place.
        for stalled_reader, _ in stalled:
            assert await asyncio.wait_for(stalled_reader.read(), TIMEOUT_S) == b""
    finally:
        for _, stalled_writer in stalled:
            stalled_writer.close()
    answer = await get_json(https_port, NAME, _pinned(der), "/inspect")
    assert answer["headers"]
