"""The secrets of a new exit node, made on the user's machine.

The token never leaves this machine except to the client: the exit node
gets only its SHA-256. The control port's TLS key and self-signed
certificate are made here too, so that the client can pin the certificate
from its very first connection; the key has to travel to the VM for that
(see deploy/civo-exit-node/README.md, "What travels where").
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tunnel.auth import generate_token, token_digest
from tunnel.tls import fingerprint, self_signed


@dataclass(frozen=True)
class NodeSecrets:
    """A node's token, and its control port's certificate and key (PEM)."""

    token: str
    tls_cert_pem: str
    tls_key_pem: str

    def __repr__(self) -> str:
        return f"NodeSecrets(<redacted>, certificate {self.fingerprint})"

    @property
    def token_hash(self) -> str:
        """What the exit server holds instead of the token: its SHA-256 in hex."""
        return token_digest(self.token).hex()

    @property
    def fingerprint(self) -> str:
        """The certificate's ``sha256:…`` fingerprint, which the client pins."""
        cert = x509.load_pem_x509_certificate(self.tls_cert_pem.encode())
        return fingerprint(cert.public_bytes(serialization.Encoding.DER))


def generate_secrets(name: str) -> NodeSecrets:
    """A fresh random token and a fresh EC P-256 key with its self-signed certificate.

    The certificate names no address (the VM has none yet); a pinned
    certificate is identified by its fingerprint alone.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    cert = self_signed(key, (), common_name=f"homeport exit node {name}")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return NodeSecrets(
        token=generate_token(),
        tls_cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        tls_key_pem=key_pem.decode(),
    )
