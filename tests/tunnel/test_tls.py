"""TLS helpers: the self-signed certificate, fingerprints, pinning."""

from __future__ import annotations

import hashlib
import os
import re
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tunnel.errors import ConfigError
from tunnel.tls import (
    CHACHA20_FIRST_SUITES,
    PinMismatch,
    aes_in_hardware,
    check_pin,
    client_context,
    ensure_self_signed,
    parse_fingerprint,
    prefer_chacha20,
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
    context = server_context(first.cert_path, first.key_path)  # loads
    assert context.options & ssl.OP_NO_RENEGOTIATION


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


LOOPBACK_NAME = "127.0.0.1"


def negotiated_cipher(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[str, str]:
    """The cipher and protocol a real handshake between the two contexts settles on (in memory)."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client.wrap_bio(to_client, to_server, server_hostname=LOOPBACK_NAME)
    server_out = ssl.MemoryBIO()
    server_side = server.wrap_bio(to_server, server_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):  # a TLS handshake is two or three flights each way
        for name, side in (("client", client_side), ("server", server_side)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        to_client.write(server_out.read())
        if all(done.values()):
            break
    assert all(done.values()), "the handshake did not finish"
    cipher = client_side.cipher()
    assert cipher is not None
    assert cipher == server_side.cipher()
    return cipher[0], cipher[1]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    made = ensure_self_signed(tmp_path_factory.mktemp("tls"), [LOOPBACK_NAME])
    return made.cert_path, made.key_path


def test_a_client_with_no_aes_instructions_gets_chacha20_and_the_others_aes_gcm(
    certificate: tuple[Path, Path],
) -> None:
    server = server_context(*certificate, aes_hardware=True)
    pi4 = client_context(pinned=True, aes_hardware=False)
    laptop = client_context(pinned=True, aes_hardware=True)
    assert negotiated_cipher(server, pi4) == ("TLS_CHACHA20_POLY1305_SHA256", "TLSv1.3")
    assert negotiated_cipher(server, laptop) == ("TLS_AES_256_GCM_SHA384", "TLSv1.3")


def test_an_exit_server_with_no_aes_instructions_gives_every_client_chacha20(
    certificate: tuple[Path, Path],
) -> None:
    server = server_context(*certificate, aes_hardware=False)
    laptop = client_context(pinned=True, aes_hardware=True)
    assert negotiated_cipher(server, laptop) == ("TLS_CHACHA20_POLY1305_SHA256", "TLSv1.3")


def test_over_tls_1_2_the_same_order_holds(certificate: tuple[Path, Path]) -> None:
    server = server_context(*certificate, aes_hardware=True)
    pi4 = client_context(pinned=True, aes_hardware=False)
    pi4.maximum_version = ssl.TLSVersion.TLSv1_2
    laptop = client_context(pinned=True, aes_hardware=True)
    laptop.maximum_version = ssl.TLSVersion.TLSv1_2
    assert negotiated_cipher(server, pi4) == ("ECDHE-ECDSA-CHACHA20-POLY1305", "TLSv1.2")
    assert negotiated_cipher(server, laptop) == ("ECDHE-ECDSA-AES256-GCM-SHA384", "TLSv1.2")


def test_chacha20_is_put_first_on_this_python() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    assert context.get_ciphers()[0]["name"] != "TLS_CHACHA20_POLY1305_SHA256"
    assert prefer_chacha20(context)
    names = [cipher["name"] for cipher in context.get_ciphers()]
    assert names[:3] == CHACHA20_FIRST_SUITES.split(":")


# What Linux's /proc/cpuinfo says on each kind of machine (abridged to the line that matters).
X86_WITH_AES_NI = "processor\t: 0\nflags\t\t: fpu vme sse2 ssse3 aes pclmulqdq avx2\n"
X86_WITHOUT = "processor\t: 0\nflags\t\t: fpu vme sse2 ssse3 pclmulqdq\n"
PI4_64_BIT = "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
PI4_32_BIT = "processor\t: 0\nFeatures\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 crc32\n"
PI5 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp\n"


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        (X86_WITH_AES_NI, True),
        (X86_WITHOUT, False),
        (PI4_64_BIT, False),
        (PI4_32_BIT, False),
        (PI5, True),
        ("", True),  # nothing said: OpenSSL's order
        ("isa\t: rv64imafdc\n", True),
    ],
    ids=["x86-aes-ni", "x86-none", "pi4-64", "pi4-32", "pi5", "empty", "risc-v"],
)
def test_aes_instructions_are_read_from_cpuinfo(cpuinfo: str, expected: bool) -> None:
    assert aes_in_hardware(cpuinfo) is expected
