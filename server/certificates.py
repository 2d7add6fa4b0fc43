"""The public HTTPS port's certificate: from an ACME CA (Let's Encrypt) or from files.

With ``--letsencrypt-domain`` the exit server gets a certificate for those
names itself, as inlets-pro and Caddy do: a child process
(:mod:`server.acme_issuer`) orders it, the exit server answers the CA's
HTTP-01 challenge on its public HTTP port (:class:`Challenges`), and the
certificate is loaded into the HTTPS port's TLS context without a restart.
The child runs again twice a day and renews the certificate once two thirds
of its lifetime have passed; a failure is logged with the CA's reason and
retried with backoff, while the HTTPS port goes on serving the certificate
it has.

With ``--https-cert``/``--https-key`` the certificate comes from files
(certbot's, a wildcard from DNS-01, a company CA's) and is loaded again
whenever they change.

Nothing here imports the ACME library or cryptography: they stay in the
child (docs/performance.md: the exit server's memory).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import json
import logging
import os
import re
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tunnel.errors import ConfigError
from tunnel.tls import OP_PRIORITIZE_CHACHA

logger = logging.getLogger("homeport.server.https")

LETSENCRYPT: Final = "https://acme-v02.api.letsencrypt.org/directory"
LETSENCRYPT_STAGING: Final = "https://acme-staging-v02.api.letsencrypt.org/directory"
#: Where the issuing child leaves the answers to the CA's challenges, under the data directory.
CHALLENGES_DIR: Final = Path("acme") / "challenges"
ACME_CHALLENGE_PREFIX: Final = b"/.well-known/acme-challenge/"
#: How often the certificate is checked (and renewed when due), as certbot's timer.
CHECK_INTERVAL_S: Final = 12 * 3600.0
#: After a failed order, the first retry; then doubling up to CHECK_INTERVAL_S. Let's
#: Encrypt allows 5 failed validations per name per hour.
RETRY_FIRST_S: Final = 600.0
#: A child that has not finished by then is killed (its own order deadline is 120 s).
ISSUE_TIMEOUT_S: Final = 300.0
#: How often --https-cert and --https-key are looked at for a change.
FILES_CHECK_INTERVAL_S: Final = 60.0

_TOKEN = re.compile(rb"[A-Za-z0-9_-]{1,128}")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def store_dir(data_dir: Path, directory_url: str) -> Path:
    """Where one CA's account and certificate are kept: staging and production never mix."""
    digest = hashlib.sha256(directory_url.encode()).hexdigest()[:12]
    return data_dir / "acme" / digest


def domain_problem(name: str) -> str | None:
    """Why ``name`` cannot be certified over HTTP-01, if it cannot."""
    if name.startswith("*."):
        return (
            f"{name}: a wildcard needs a DNS-01 challenge; get it with your DNS provider's "
            "tools and give it with --https-cert/--https-key"
        )
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return f"{name}: Let's Encrypt certifies names, not IP addresses; give a DNS name"
    labels = name.split(".")
    if (
        len(name) > 253
        or len(labels) < 2
        or name != name.lower()
        or not all(_LABEL.fullmatch(label) for label in labels)
    ):
        return (
            f"{name!r} is not a DNS name a CA certifies (lower-case letters, digits "
            "and hyphens, in two labels or more, e.g. fn.example.com)"
        )
    return None


def email_problem(email: str) -> str | None:
    local, at, domain = email.partition("@")
    if not at or not local or "." not in domain or any(c.isspace() for c in email):
        return f"--letsencrypt-email {email!r} is not an email address"
    return None


def public_context() -> ssl.SSLContext:
    """The HTTPS port's TLS context: TLS 1.2 and 1.3, HTTP/1.1 by ALPN, no certificate yet.

    Python's defaults for a server (no compression, our cipher order,
    forward-secret AEAD ciphers only) and: no renegotiation, which a TLS 1.2
    visitor could ask for again and again to make us do a handshake's work
    each time; ChaCha20-Poly1305 for a visitor that lists it first (a phone
    or a board with no AES instructions).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION | OP_PRIORITIZE_CHACHA
    context.set_alpn_protocols(["http/1.1"])
    return context


def load(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    """Put ``cert`` and ``key`` in ``context``: every handshake from now on presents them.

    They are tried in a context of their own first: one that fails half way
    would leave the live context with a certificate and a key that do not
    belong together, where now it keeps the pair it had.

    Raises:
        ConfigError: they cannot be read or do not belong together.
    """
    try:
        public_context().load_cert_chain(cert, key)
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the HTTPS certificate {cert} with key {key}: {exc}"
        ) from None


class Challenges:
    """Answers the CA's HTTP-01 challenges for our names, from what the child wrote.

    Only requests for one of the names being certified are answered here;
    the same path on any other host goes through the tunnel as usual, so an
    upstream that gets its own certificates (Caddy on the Pi) still can.
    """

    def __init__(self, domains: tuple[str, ...], directory: Path) -> None:
        self.domains = frozenset(domains)
        self.directory = directory

    def answer(self, host: str | None, target: bytes) -> tuple[int, bytes | None] | None:
        """This request's status and body (None: the status's own); None when not ours."""
        if host not in self.domains or not target.startswith(ACME_CHALLENGE_PREFIX):
            return None
        token = target[len(ACME_CHALLENGE_PREFIX) :]
        if _TOKEN.fullmatch(token) is None:
            return 404, None
        try:
            return 200, (self.directory / token.decode()).read_bytes()
        except OSError:
            return 404, None


@dataclass(frozen=True)
class Issued:
    """What the issuing child reports on success."""

    status: str  # "issued" or "current"
    cert: Path
    key: Path
    not_after: datetime.datetime
    renew_at: datetime.datetime


class AcmeCertificates:
    """Keeps the HTTPS context's certificate from an ACME CA: got, loaded, renewed."""

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        domains: tuple[str, ...],
        email: str | None,
        directory_url: str,
        ca_file: Path | None,
        data_dir: Path,
        user_agent: str,
    ) -> None:
        self.context = context
        self.domains = domains
        self.email = email
        self.directory_url = directory_url
        self.ca_file = ca_file
        self.data_dir = data_dir
        self.user_agent = user_agent
        #: the certificate being served, once the child has reported on it
        self.current: Issued | None = None
        #: whether the context holds a certificate (a kept one is loaded at start)
        self.loaded = False
        self.failures = 0
        self._task: asyncio.Task[None] | None = None
        self._child: asyncio.subprocess.Process | None = None
        self._wake = asyncio.Event()

    def start(self) -> None:
        """Serve the kept certificate at once, if there is one; check and renew it from now on.

        After a restart (a power cut) the HTTPS port has its certificate
        before the first handshake, not once the child has looked at it.
        """
        store = store_dir(self.data_dir, self.directory_url)
        cert, key = store / "cert.pem", store / "key.pem"
        if cert.exists() and key.exists():
            try:
                load(self.context, cert, key)
                self.loaded = True
            except ConfigError as exc:
                logger.warning("%s; ordering a new one", exc)
        self._task = asyncio.get_running_loop().create_task(self._keep_current())

    def reload(self) -> None:
        """Check the certificate now (SIGHUP), not at the next check or retry."""
        self._wake.set()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._child is not None and self._child.returncode is None:
            self._child.kill()

    async def _keep_current(self) -> None:
        retry_s = RETRY_FIRST_S
        while True:
            issued = await self._run_child()
            if issued is None:
                self.failures += 1
                logger.warning(
                    "no HTTPS certificate from %s for %s this time; trying again in %.0f min%s",
                    self.directory_url,
                    ", ".join(self.domains),
                    retry_s / 60,
                    " (the one it has is still served)" if self.loaded else "",
                )
                await self._pause(retry_s)
                retry_s = min(retry_s * 2, CHECK_INTERVAL_S)
                continue
            retry_s = RETRY_FIRST_S
            if issued.status == "issued" or not self.loaded:
                try:
                    load(self.context, issued.cert, issued.key)
                except ConfigError as exc:
                    logger.error("%s", exc)
                    await self._pause(retry_s)
                    continue
                self.loaded = True
            if issued.status == "issued" or self.current is None:
                verb = "new" if issued.status == "issued" else "kept"
                logger.info(
                    "HTTPS certificate (%s) for %s, valid until %s; renewing from %s",
                    verb,
                    ", ".join(self.domains),
                    f"{issued.not_after:%Y-%m-%d %H:%M} UTC",
                    f"{issued.renew_at:%Y-%m-%d}",
                )
            self.current = issued
            now = datetime.datetime.now(datetime.UTC)
            due_s = (issued.renew_at - now).total_seconds()
            await self._pause(max(1.0, min(due_s, CHECK_INTERVAL_S)))

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less if :meth:`reload` is called (or was, during the last check)."""
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            pass
        self._wake.clear()

    async def _run_child(self) -> Issued | None:
        """Run :mod:`server.acme_issuer` once; what it reports, or None when it failed."""
        args = [sys.executable, "-m", "server.acme_issuer", "--directory", self.directory_url]
        for domain in self.domains:
            args += ["--domain", domain]
        if self.email:
            args += ["--email", self.email]
        args += ["--data-dir", str(self.data_dir), "--user-agent", self.user_agent]
        env = dict(os.environ)
        if self.ca_file is not None:
            env["REQUESTS_CA_BUNDLE"] = str(self.ca_file)
        try:
            self._child = child = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
        except OSError as exc:
            logger.error("cannot start the ACME child (%s): %s", args[0], exc.strerror or exc)
            return None
        try:
            async with asyncio.timeout(ISSUE_TIMEOUT_S):
                output, errors = await child.communicate()
        except TimeoutError:
            child.kill()
            await child.wait()
            logger.error("the ACME order did not finish within %.0f s", ISSUE_TIMEOUT_S)
            return None
        finally:
            self._child = None
        failed = child.returncode != 0
        lines = [line for line in errors.decode(errors="replace").splitlines() if line.strip()]
        for i, line in enumerate(lines):  # the progress; when it failed, the reason last
            last_of_failed = failed and i == len(lines) - 1
            logger.log(logging.ERROR if last_of_failed else logging.INFO, "acme: %s", line)
        if failed:
            return None
        try:
            report = json.loads(output.decode().splitlines()[-1])
            return Issued(
                status=report["status"],
                cert=Path(report["cert"]),
                key=Path(report["key"]),
                not_after=datetime.datetime.fromisoformat(report["not_after"]),
                renew_at=datetime.datetime.fromisoformat(report["renew_at"]),
            )
        except (ValueError, KeyError, IndexError, TypeError):
            logger.error("the ACME child's report is unreadable: %r", output[-200:])
            return None


class CertificateFiles:
    """Keeps the HTTPS context's certificate from files, loaded again when they change."""

    def __init__(self, context: ssl.SSLContext, cert: Path, key: Path) -> None:
        self.context = context
        self.cert = cert
        self.key = key
        self._seen = self._stamp()
        self._timer: asyncio.TimerHandle | None = None

    def _stamp(self) -> tuple[float, float] | None:
        try:
            return (self.cert.stat().st_mtime, self.key.stat().st_mtime)
        except OSError:
            return None

    def start(self) -> None:
        """Load the files now (ConfigError if they are not a certificate and its key)."""
        load(self.context, self.cert, self.key)
        self._timer = asyncio.get_running_loop().call_later(FILES_CHECK_INTERVAL_S, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _check(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(FILES_CHECK_INTERVAL_S, self._check)
        stamp = self._stamp()
        if stamp != self._seen and stamp is not None:
            self._seen = stamp
            self._load_again("it changed")

    def reload(self) -> None:
        """Load the files again now (SIGHUP: certbot's deploy hook, ``systemctl reload``)."""
        self._seen = self._stamp()
        self._load_again("asked to (SIGHUP)")

    def _load_again(self, why: str) -> None:
        try:
            load(self.context, self.cert, self.key)
        except ConfigError as exc:
            logger.warning("%s; still serving the certificate loaded before", exc)
            return
        logger.info("HTTPS certificate %s loaded again: %s", self.cert, why)
