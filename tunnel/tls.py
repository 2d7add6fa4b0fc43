"""TLS for the control channel, with no domain and no CA needed (docs/security.md).

``homeport server --auto-tls`` makes a private key and a self-signed
certificate once, in its data directory, and prints the certificate's
fingerprint. The client pins it with ``--fingerprint sha256:…``: the
certificate is checked right after the TLS handshake and before a single
byte of HTTP (so before the token) is sent. Names and expiry do not matter
to a pinned certificate; its fingerprint is the identity.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import re
import ssl
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, cast

from tunnel.errors import ConfigError, TunnelError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509 import Certificate as X509Certificate

# cryptography is imported where a certificate is made or read, not here:
# every homeport process imports this module, and cryptography alone would
# add ~15 MiB to a client's resident memory (docs/performance.md).

#: The TLS 1.3 suites of a side whose CPU has no AES instructions, ChaCha20
#: first, then OpenSSL's own order. A Raspberry Pi 4, 3 or Zero 2 has none:
#: its AES-GCM runs in software, several times slower than ChaCha20-Poly1305
#: (docs/performance.md).
CHACHA20_FIRST_SUITES: Final = (
    "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256"
)
#: The same order for TLS 1.2: Python's default cipher string, ChaCha20 first.
CHACHA20_FIRST_CIPHERS: Final = (
    "@SECLEVEL=2:ECDH+CHACHA20:ECDH+AESGCM:ECDH+AES:DHE+AES:!aNULL:!eNULL:!aDSS:!SHA1:!AESCCM"
)
#: OpenSSL's SSL_OP_PRIORITIZE_CHACHA, which Python names no constant for:
#: a server choosing by its own order (Python's default) still gives
#: ChaCha20-Poly1305 to a client that lists it first.
OP_PRIORITIZE_CHACHA: Final = 1 << 21

CERT_FILE: Final = "tls.crt"
KEY_FILE: Final = "tls.key"
CERT_VALIDITY_DAYS: Final = 3650
_FINGERPRINT = re.compile(r"sha256:([0-9a-f]{64})")


class PinMismatch(TunnelError):
    """The server's certificate is not the one the client pinned."""


def fingerprint(der: bytes) -> str:
    """A certificate's identity as homeport prints it: ``sha256:`` and 64 hex digits."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


def parse_fingerprint(text: str) -> bytes:
    """Read ``sha256:<64 hex>`` (colons between bytes and upper case tolerated).

    Raises:
        ConfigError: not a SHA-256 fingerprint.
    """
    cleaned = text.strip().lower()
    if cleaned.startswith("sha256:"):
        cleaned = "sha256:" + cleaned[7:].replace(":", "")
    match = _FINGERPRINT.fullmatch(cleaned)
    if match is None:
        raise ConfigError(
            f"--fingerprint {text!r} must be sha256: followed by 64 hex digits, "
            "as the exit server prints it at start"
        )
    return bytes.fromhex(match.group(1))


def default_data_dir() -> Path:
    """Where the server keeps its TLS key: systemd's StateDirectory, else XDG's state home."""
    if state := os.environ.get("STATE_DIRECTORY"):
        return Path(state.split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "homeport"


@dataclass(frozen=True)
class Certificate:
    cert_path: Path
    key_path: Path
    fingerprint: str
    sans: tuple[str, ...]
    created: bool


def ensure_self_signed(data_dir: Path, sans: list[str]) -> Certificate:
    """The server's self-signed certificate: made on first use, then always the same.

    It is never replaced automatically, since clients pin its fingerprint;
    delete the two files to make a new one. cryptography never loads in
    this process: a forked child makes the key and certificate, and an
    existing certificate is read with the ``ssl`` module. The exit server
    runs for months after this, and cryptography would hold ~10 MiB of
    it all that time (docs/performance.md).

    Raises:
        ConfigError: the directory or files cannot be written or read.
    """
    cert_path, key_path = data_dir / CERT_FILE, data_dir / KEY_FILE
    created = not (cert_path.exists() and key_path.exists())
    if created:
        _in_child(_make_self_signed, data_dir, sans)
    der, names = _read_certificate(cert_path)
    return Certificate(cert_path, key_path, fingerprint(der), names, created=created)


def _make_self_signed(data_dir: Path, sans: list[str]) -> None:
    """Write a new private key and a self-signed certificate for it into ``data_dir``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    cert_path, key_path = data_dir / CERT_FILE, data_dir / KEY_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self_signed(key, sans)
        _write_private(key_path, key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))  # fmt: skip
        _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    except OSError as exc:
        raise ConfigError(f"cannot keep the TLS key in {data_dir}: {exc.strerror}") from None


def _in_child(work: Callable[[Path, list[str]], None], data_dir: Path, sans: list[str]) -> None:
    """Run ``work`` in a forked child and wait for it; its ConfigError is raised here.

    Raises:
        ConfigError: what the child raised, or that it failed otherwise.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_end)
        status = 0
        try:
            work(data_dir, sans)
        except ConfigError as exc:
            os.write(write_end, str(exc).encode())
            status = 1
        except BaseException as exc:  # noqa: BLE001 - the child must never run on as the parent
            os.write(write_end, f"making the TLS certificate failed: {exc!r}".encode())
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise ConfigError(message or f"making the TLS certificate failed (status {status})")


def _read_certificate(cert_path: Path) -> tuple[bytes, tuple[str, ...]]:
    """A PEM certificate's DER bytes and the names it lists, read with the ``ssl`` module.

    ``SSLContext.get_ca_certs`` decodes the certificates a context trusts
    (ours is its own CA); one that is not a CA comes back as DER alone,
    with no names known.

    Raises:
        ConfigError: the file cannot be read or holds no PEM certificate.
    """
    try:
        text = cert_path.read_text()
        der = ssl.PEM_cert_to_DER_cert(text)
    except (OSError, UnicodeDecodeError, ValueError):
        raise ConfigError(
            f"{cert_path} is not a PEM certificate; delete it to make a new one"
        ) from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=der)
    except ssl.SSLError:
        raise ConfigError(
            f"{cert_path} is not a PEM certificate; delete it to make a new one"
        ) from None
    decoded = context.get_ca_certs()
    if not decoded:
        return der, ()
    # ("DNS", name) and ("IP Address", address) pairs, as _ssl decodes them.
    alt_names = cast(tuple[tuple[str, str], ...], decoded[0].get("subjectAltName", ()))
    names = []
    for kind, value in alt_names:
        if kind == "DNS":
            names.append(value)
        elif kind == "IP Address":
            names.append(str(ipaddress.ip_address(value.strip())))
    return der, tuple(names)


def self_signed(
    key: ec.EllipticCurvePrivateKey,
    sans: Sequence[str],
    common_name: str = "homeport exit server",
    valid_from: datetime.datetime | None = None,
) -> X509Certificate:
    """A self-signed certificate for ``key``, valid CERT_VALIDITY_DAYS, naming ``sans``.

    Valid from ``valid_from``, by default a day ago (a day of slack for
    clients whose clock is a little behind).

    Clients pin it by fingerprint, so it needs no names; IP addresses and
    host names in ``sans`` let a CA-style check (``--ca-file``) pass too.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    names: list[x509.GeneralName] = []
    for san in sans:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            names.append(x509.DNSName(san))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from or now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=CERT_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256())


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def server_context(
    cert_path: Path, key_path: Path, *, aes_hardware: bool | None = None
) -> ssl.SSLContext:
    """A TLS 1.2+ server context for the control port.

    It gives ChaCha20-Poly1305 to a client that asks for it first (a client
    on a CPU with no AES instructions: :func:`client_context`), AES-GCM to
    the others, and ChaCha20-Poly1305 to all when this CPU itself has no AES
    instructions (``aes_hardware``: detected by :func:`aes_in_hardware`
    unless given).

    Raises:
        ConfigError: the certificate or key cannot be loaded.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # No renegotiation: before it has shown a token, a TLS 1.2 peer could
    # otherwise ask for handshake after handshake.
    context.options |= OP_PRIORITIZE_CHACHA | ssl.OP_NO_RENEGOTIATION
    _order_ciphers_for_this_cpu(context, aes_hardware)
    try:
        context.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the TLS certificate {cert_path} and key {key_path}: {exc}"
        ) from None
    return context


def client_context(
    *, ca_file: Path | None = None, pinned: bool = False, aes_hardware: bool | None = None
) -> ssl.SSLContext:
    """A client context: the system's CAs, a given CA, or none at all when pinning.

    A pinned connection verifies nothing here; :func:`check_pin` then compares
    the certificate's fingerprint, before anything is sent. On a CPU with no
    AES instructions (``aes_hardware``: detected by :func:`aes_in_hardware`
    unless given) the client asks for ChaCha20-Poly1305 first, which
    :func:`server_context` grants.

    Raises:
        ConfigError: the CA file cannot be loaded.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _order_ciphers_for_this_cpu(context, aes_hardware)
    if pinned:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        if ca_file is not None:
            context.load_verify_locations(cafile=ca_file)
        else:
            context.load_default_certs()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the CA file {ca_file}: {exc}") from None
    return context


def _order_ciphers_for_this_cpu(context: ssl.SSLContext, aes_hardware: bool | None) -> None:
    """ChaCha20-Poly1305 first where the CPU (``aes_hardware``, else detected) lacks AES."""
    if not (aes_in_hardware() if aes_hardware is None else aes_hardware):
        prefer_chacha20(context)


def aes_in_hardware(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has AES instructions (x86's AES-NI, Arm's crypto extension).

    Read from the first ``flags`` (x86) or ``Features`` (Arm) line of
    ``/proc/cpuinfo``, or of ``cpuinfo`` when given. Where Linux does not
    say (another system, another line), assume it has them and keep
    OpenSSL's order, which puts AES-GCM first.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return True
    for line in cpuinfo.splitlines():
        key, colon, value = line.partition(":")
        if colon and key.strip() in ("flags", "Features"):
            return "aes" in value.split()
    return True


def prefer_chacha20(context: ssl.SSLContext) -> bool:
    """Put ChaCha20-Poly1305 first in ``context``'s TLS 1.3 and 1.2 lists; return whether it is.

    Python has a setter for TLS 1.3's suites only from 3.15
    (``SSLContext.set_ciphersuites``). Before, OpenSSL's
    ``SSL_CTX_set_ciphersuites`` is called on the context's ``SSL_CTX``,
    which CPython keeps right after the object's header; the pointer is
    used only once ``SSL_CTX_get_options`` read the context's own options
    through it. Where none of that is possible the order stays OpenSSL's:
    slower on a CPU with no AES instructions, never wrong.
    """
    context.set_ciphers(CHACHA20_FIRST_CIPHERS)
    setter = getattr(context, "set_ciphersuites", None)
    if setter is not None:
        setter(CHACHA20_FIRST_SUITES)
    elif not _set_ciphersuites_via_openssl(context, CHACHA20_FIRST_SUITES):
        return False
    first = context.get_ciphers()[0]["name"]
    return bool(first == CHACHA20_FIRST_SUITES.split(":")[0])


def _set_ciphersuites_via_openssl(context: ssl.SSLContext, suites: str) -> bool:
    """``SSL_CTX_set_ciphersuites`` on ``context`` through ctypes (CPython before 3.15)."""
    if sys.implementation.name != "cpython":
        return False
    import _ssl
    import ctypes

    try:
        # The _ssl module's handle also finds the libssl it was linked with.
        openssl = ctypes.CDLL(_ssl.__file__)
        get_options = openssl.SSL_CTX_get_options
        set_ciphersuites = openssl.SSL_CTX_set_ciphersuites
    except (OSError, AttributeError):
        return False
    get_options.argtypes = (ctypes.c_void_p,)
    get_options.restype = ctypes.c_uint64
    set_ciphersuites.argtypes = (ctypes.c_void_p, ctypes.c_char_p)
    set_ciphersuites.restype = ctypes.c_int
    ssl_ctx = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not ssl_ctx or get_options(ssl_ctx) != int(context.options):
        return False
    return bool(set_ciphersuites(ssl_ctx, suites.encode()))


def check_pin(der: bytes | None, expected: bytes) -> None:
    """Compare a peer certificate with the pinned SHA-256.

    Raises:
        PinMismatch: no certificate, or another one than pinned.
    """
    if der is None:
        raise PinMismatch("the server presented no certificate")
    if not hmac.compare_digest(hashlib.sha256(der).digest(), expected):
        raise PinMismatch(
            f"the server's certificate {fingerprint(der)} is not the pinned "
            f"sha256:{expected.hex()}; refusing to send the token (a different server, "
            "or its certificate was remade)"
        )
