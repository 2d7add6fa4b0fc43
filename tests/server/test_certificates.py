"""The HTTPS certificate's rules: names, challenge answers, renewal and reloading."""

from __future__ import annotations

import asyncio
import datetime
import os
import ssl
from pathlib import Path

import pytest

from server import certificates
from server.acme_issuer import current_certificate, renew_at
from server.certificates import (
    CertificateFiles,
    Challenges,
    domain_problem,
    email_problem,
    public_context,
    store_dir,
)
from server.config import tcp_ports_problem
from tests.support.certificates import as_der, certificate, write_pair

NAME = "fn.example.com"


@pytest.mark.parametrize(
    "name", ["fn.example.com", "a.b.c.example.org", "x1-2.example", "xn--bcher-kva.example"]
)
def test_names_a_ca_certifies_over_http01_pass(name: str) -> None:
    assert domain_problem(name) is None


@pytest.mark.parametrize(
    "name",
    [
        "*.example.com",
        "203.0.113.7",
        "2001:db8::1",
        "localhost",
        "Fn.example.com",  # the command line lower-cases first
        "fn..example.com",
        "-fn.example.com",
        "fn-.example.com",
        "fn_1.example.com",
        "bücher.example",
        "a" * 64 + ".example",
        ("a" * 60 + ".") * 5 + "example",
        "fn.example.com/path",
        "",
    ],
)
def test_names_no_ca_would_certify_are_refused_with_a_reason(name: str) -> None:
    assert domain_problem(name)


@pytest.mark.parametrize(
    ("email", "fine"),
    [
        ("owner@example.com", True),
        ("owner", False),
        ("@example.com", False),
        ("owner@localhost", False),
        ("own er@example.com", False),
    ],
)
def test_an_email_address_is_checked_for_its_shape(email: str, fine: bool) -> None:
    assert (email_problem(email) is None) is fine


def test_the_https_port_may_not_be_another_port() -> None:
    assert tcp_ports_problem((), 80, 8123, 443) is None
    assert tcp_ports_problem((), 0, 0, 0) is None  # ephemeral ports, as the tests use
    assert tcp_ports_problem((), 443, 8123, 443) == "--https-port 443 is the --port already"
    assert tcp_ports_problem((443,), 80, 8123, 443) == "--tcp-port 443 is the --https-port already"
    assert tcp_ports_problem((443,), 80, 8123, None) is None  # HTTPS not served


# -- the HTTP-01 answers -----------------------------------------------------------------------


@pytest.fixture
def challenges(tmp_path: Path) -> Challenges:
    (tmp_path / "tok-en_1").write_bytes(b"tok-en_1.thumbprint")
    (tmp_path.parent / "secret").write_bytes(b"not for visitors")
    return Challenges((NAME,), tmp_path)


def test_a_challenge_for_a_certified_name_is_answered_with_its_key_authorization(
    challenges: Challenges,
) -> None:
    assert challenges.answer(NAME, b"/.well-known/acme-challenge/tok-en_1") == (
        200,
        b"tok-en_1.thumbprint",
    )


@pytest.mark.parametrize(
    "target",
    [
        b"/.well-known/acme-challenge/unknown",
        b"/.well-known/acme-challenge/",
        b"/.well-known/acme-challenge/../secret",
        b"/.well-known/acme-challenge/..%2Fsecret",
        b"/.well-known/acme-challenge/tok-en_1?x=1",
        b"/.well-known/acme-challenge/tok-en_1/",
        b"/.well-known/acme-challenge/" + b"a" * 129,
        b"/.well-known/acme-challenge/\xff",
    ],
)
def test_anything_else_under_the_challenge_path_is_not_found(
    challenges: Challenges, target: bytes
) -> None:
    assert challenges.answer(NAME, target) == (404, None)


def test_other_hosts_and_other_paths_are_not_ours_to_answer(challenges: Challenges) -> None:
    assert challenges.answer("other.example.com", b"/.well-known/acme-challenge/tok-en_1") is None
    assert challenges.answer(None, b"/.well-known/acme-challenge/tok-en_1") is None
    assert challenges.answer(NAME, b"/") is None
    assert challenges.answer(NAME, b"/.well-known/security.txt") is None


# -- renewal -------------------------------------------------------------------------------------


def _keep(store: Path, names: list[str], *, age_days: float, life_days: float = 90) -> None:
    write_pair(store, *certificate(names, age_days=age_days, life_days=life_days))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def test_a_certificate_is_kept_until_two_thirds_of_its_life_then_renewed(tmp_path: Path) -> None:
    _keep(tmp_path, [NAME], age_days=59)
    cert = current_certificate(tmp_path, [NAME], _now())
    assert cert is not None
    assert renew_at(cert) == cert.not_valid_before_utc + datetime.timedelta(days=60)
    _keep(tmp_path, [NAME], age_days=61)
    assert current_certificate(tmp_path, [NAME], _now()) is None
    # The same share of the shorter lifetimes CAs are moving to: 6 of 9 days.
    _keep(tmp_path, [NAME], age_days=5.9, life_days=9)
    assert current_certificate(tmp_path, [NAME], _now()) is not None
    _keep(tmp_path, [NAME], age_days=6.1, life_days=9)
    assert current_certificate(tmp_path, [NAME], _now()) is None


def test_a_certificate_naming_other_domains_is_replaced(tmp_path: Path) -> None:
    _keep(tmp_path, [NAME, "www.example.com"], age_days=1)
    assert current_certificate(tmp_path, ["www.example.com", NAME], _now()) is not None
    assert current_certificate(tmp_path, [NAME], _now()) is None
    assert current_certificate(tmp_path, [NAME, "www.example.com", "x.example.com"], _now()) is None


def test_a_certificate_whose_key_is_not_its_own_or_is_unreadable_is_replaced(
    tmp_path: Path,
) -> None:
    _keep(tmp_path / "a", [NAME], age_days=1)
    _keep(tmp_path / "b", [NAME], age_days=1)
    (tmp_path / "a" / "key.pem").write_bytes((tmp_path / "b" / "key.pem").read_bytes())
    assert current_certificate(tmp_path / "a", [NAME], _now()) is None
    (tmp_path / "b" / "cert.pem").write_text("not a certificate")
    assert current_certificate(tmp_path / "b", [NAME], _now()) is None
    assert current_certificate(tmp_path / "nothing", [NAME], _now()) is None


def test_each_ca_keeps_its_account_and_certificate_apart(tmp_path: Path) -> None:
    production = store_dir(tmp_path, certificates.LETSENCRYPT)
    staging = store_dir(tmp_path, certificates.LETSENCRYPT_STAGING)
    assert production != staging
    assert production.parent == staging.parent == tmp_path / "acme"


def test_the_https_context_refuses_renegotiation_and_old_protocols() -> None:
    context = public_context()
    assert context.options & ssl.OP_NO_RENEGOTIATION
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


# -- certificates from files -------------------------------------------------------------------


def _write_pair(directory: Path) -> bytes:
    cert, key = certificate([NAME])
    write_pair(directory, cert, key)
    return as_der(cert)


async def _presented(context: ssl.SSLContext) -> bytes:
    """The certificate a handshake with ``context`` presents: DER."""
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    client = ssl.create_default_context()
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    async with server:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
    return bytes(der)


async def test_changed_files_are_loaded_at_the_next_look_and_a_broken_change_is_not(
    tmp_path: Path,
) -> None:
    first = _write_pair(tmp_path)
    context = public_context()
    files = CertificateFiles(context, tmp_path / "cert.pem", tmp_path / "key.pem")
    files.start()
    try:
        assert await _presented(context) == first
        files._check()  # nothing changed: nothing loaded
        second = _write_pair(tmp_path)
        later = datetime.datetime.now().timestamp() + 5
        os.utime(tmp_path / "cert.pem", (later, later))
        files._check()
        assert await _presented(context) == second
        (tmp_path / "key.pem").write_text("half written")
        os.utime(tmp_path / "key.pem", (later + 5, later + 5))
        files._check()
        assert await _presented(context) == second  # the pair that works is kept
    finally:
        files.stop()


async def test_a_visitor_offering_http2_is_given_http1_1_by_alpn(tmp_path: Path) -> None:
    _write_pair(tmp_path)
    context = public_context()
    certificates.load(context, tmp_path / "cert.pem", tmp_path / "key.pem")
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    client = ssl.create_default_context()
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.set_alpn_protocols(["h2", "http/1.1"])
    async with server:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
        writer.close()
