"""TLS helpers: the self-signed certificate, fingerprints, pinning."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tunnel.errors import ConfigError
from tunnel.tls import (
    PinMismatch,
    check_pin,
    client_context,
    ensure_self_signed,
    parse_fingerprint,
    server_context,
)


def der_of(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )


def test_a_self_signed_certificate_is_made_once_with_private_files(tmp_path: Path) -> None:
    first = ensure_self_signed(tmp_path / "state", ["203.0.113.10", "exit.example.com"])
    assert first.created
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", first.fingerprint)
    for path in (first.cert_path, first.key_path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert set(first.sans) == {"203.0.113.10", "exit.example.com"}
    again = ensure_self_signed(tmp_path / "state", ["198.51.100.7"])
    assert not again.created
    assert again.fingerprint == first.fingerprint  # pinned clients keep working
    server_context(first.cert_path, first.key_path)  # loads


def test_fingerprints_parse_in_the_printed_form_and_common_variants() -> None:
    digest = bytes(range(32))
    printed = "sha256:" + digest.hex()
    assert parse_fingerprint(printed) == digest
    assert parse_fingerprint(printed.upper().replace("SHA256:", "sha256:")) == digest
    assert parse_fingerprint("sha256:" + ":".join(f"{b:02X}" for b in digest)) == digest
    for bad in ("", digest.hex(), "sha1:" + digest.hex(), "sha256:abc", "sha256:" + "zz" * 32):
        with pytest.raises(ConfigError, match="64 hex digits"):
            parse_fingerprint(bad)


def test_the_pin_accepts_its_certificate_only(tmp_path: Path) -> None:
    ours = ensure_self_signed(tmp_path / "a", [])
    theirs = ensure_self_signed(tmp_path / "b", [])
    der = der_of(ours.cert_path)
    check_pin(der, parse_fingerprint(ours.fingerprint))
    with pytest.raises(PinMismatch, match="refusing to send the token"):
        check_pin(der_of(theirs.cert_path), parse_fingerprint(ours.fingerprint))
    with pytest.raises(PinMismatch, match="no certificate"):
        check_pin(None, parse_fingerprint(ours.fingerprint))


def test_a_pinned_context_leaves_verification_to_the_pin() -> None:
    import ssl

    pinned = client_context(pinned=True)
    assert pinned.verify_mode == ssl.CERT_NONE
    assert not pinned.check_hostname
    assert client_context().verify_mode == ssl.CERT_REQUIRED


def test_unloadable_tls_material_is_a_clear_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load the TLS certificate"):
        server_context(tmp_path / "none.crt", tmp_path / "none.key")
    with pytest.raises(ConfigError, match="cannot load the CA file"):
        client_context(ca_file=tmp_path / "none.pem")
