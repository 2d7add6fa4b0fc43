"""TLS helpers: the self-signed certificate, fingerprints, pinning."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import sys
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


def test_the_certificate_is_made_and_read_without_loading_cryptography(tmp_path: Path) -> None:
    # The exit server runs for months after this: cryptography would hold ~10 MiB.
    script = (
        "import sys; from pathlib import Path; from tunnel.tls import ensure_self_signed\n"
        "sans = ['203.0.113.10', '2001:db8::7', 'exit.example.com']\n"
        "made = ensure_self_signed(Path(sys.argv[1]), sans)\n"
        "read = ensure_self_signed(Path(sys.argv[1]), sans)\n"
        "assert (made.created, read.created) == (True, False)\n"
        "assert made.fingerprint == read.fingerprint\n"
        "assert set(made.sans) == set(read.sans) == set(sans), read.sans\n"
        "assert not [name for name in sys.modules if name.startswith('cryptography')]\n"
        "print(read.fingerprint)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    # The fingerprint is the certificate's own, as cryptography computes it.
    der = der_of(tmp_path / "state" / "tls.crt")
    assert done.stdout.strip() == "sha256:" + hashlib.sha256(der).hexdigest()


def test_a_certificate_that_cannot_be_made_or_read_is_a_clear_config_error(
    tmp_path: Path,
) -> None:
    in_the_way = tmp_path / "file"
    in_the_way.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot keep the TLS key in"):
        ensure_self_signed(in_the_way / "state", [])  # the forked child's error, raised here
    state = tmp_path / "state"
    ensure_self_signed(state, [])
    (state / "tls.crt").write_text("-----BEGIN CERTIFICATE-----\nnot base64!\n")
    with pytest.raises(ConfigError, match="is not a PEM certificate"):
        ensure_self_signed(state, [])


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
