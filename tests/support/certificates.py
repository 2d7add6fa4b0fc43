"""Certificates and keys for the tests, written as PEM files the way servers read them."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def write_pair(
    directory: Path,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    *,
    cert_name: str = "cert.pem",
    key_name: str = "key.pem",
) -> tuple[Path, Path]:
    """Write ``cert`` and ``key`` (PKCS#8, unencrypted) into ``directory``: their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / cert_name, directory / key_name
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def as_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def certificate(
    names: list[str],
    *,
    key: ec.EllipticCurvePrivateKey | None = None,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None = None,
    age_days: float = 1,
    life_days: float = 90,
    ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for ``names`` (DNS names), issued ``age_days`` ago for ``life_days``.

    Self-signed unless ``issuer`` (its name and key) is given; a CA with
    ``ca``; ``sans`` instead of DNS names for ``names``.
    """
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "test")])
    issuer_name, signer = issuer if issuer is not None else (subject, key)
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=age_days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=life_days))
    )
    alternative = sans if sans is not None else [x509.DNSName(name) for name in names]
    if alternative:
        builder = builder.add_extension(x509.SubjectAlternativeName(alternative), critical=False)
    if ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
    return builder.sign(signer, hashes.SHA256()), key
