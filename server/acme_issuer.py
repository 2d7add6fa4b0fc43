"""Get or renew the public HTTPS port's certificate from an ACME CA (Let's Encrypt).

Run by the exit server as a child process (``python -m server.acme_issuer``,
:mod:`server.certificates`), at start and twice a day: the ACME library
(certbot's ``acme``, with ``requests``, ``josepy`` and ``cryptography``) and
its blocking calls then live only in that child, for a few seconds, instead
of their 20 MiB (measured, imported) for the life of the exit server.

The child keeps, under ``DATA_DIR/acme/<CA>/``:

- ``account.key``: the ACME account's key (EC P-256), made on first use;
- ``cert.pem`` and ``key.pem``: the certificate chain and its key (a new key
  at each issue, as certbot does).

A certificate is renewed once two thirds of its lifetime have passed (30
days before the end of a 90-day one, as Let's Encrypt advises, and the same
share of the shorter lifetimes it is moving to), when it does not name the
configured domains exactly, or when its key does not match it.

The HTTP-01 challenge: for each name, the child writes the key
authorization to ``DATA_DIR/acme/challenges/<token>``; the exit server,
which listens on port 80, answers
``GET /.well-known/acme-challenge/<token>`` for that name from there
(:class:`server.certificates.Challenges`).

The child's last line on stdout is a JSON object: ``status`` (``issued`` or
``current``), ``not_after`` and ``renew_at`` (ISO 8601, UTC). Its progress
and any error go to stderr, one line each, for the exit server's log. Exit
status 0 on success, 1 on a failure the CA or the network explains (the
message says which), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.certificates import CHALLENGES_DIR, store_dir

#: How long a whole order (validation and issue) may take.
ORDER_DEADLINE_S: Final = 120
#: Renew once this share of a certificate's lifetime has passed.
RENEW_AFTER_SHARE: Final = 2 / 3


class IssueError(Exception):
    """A failure the CA or the network explains; the message says what to fix."""


def renew_at(cert: x509.Certificate) -> datetime.datetime:
    """When ``cert`` should be renewed: two thirds into its lifetime."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * RENEW_AFTER_SHARE


def current_certificate(
    store: Path, domains: Sequence[str], now: datetime.datetime
) -> x509.Certificate | None:
    """The kept certificate if it needs nothing: names, key and time all right."""
    try:
        cert = x509.load_pem_x509_certificate((store / "cert.pem").read_bytes())
        key = serialization.load_pem_private_key((store / "key.pem").read_bytes(), None)
    except (OSError, ValueError, TypeError):
        return None
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    if sorted(names.value.get_values_for_type(x509.DNSName)) != sorted(domains):
        return None
    if cert.public_key() != key.public_key():
        return None
    if now >= renew_at(cert):
        return None
    return cert


def _account_key(store: Path) -> ec.EllipticCurvePrivateKey:
    path = store / "account.key"
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    except FileNotFoundError:
        key = ec.generate_private_key(ec.SECP256R1())
        _write_private(path, _pem(key))
        return key
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IssueError(f"{path} is not an EC private key; move it away to make a new account")
    return key


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all, readable by its owner only."""
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # noqa: T201 - for the exit server's log


def issue(
    directory_url: str,
    domains: Sequence[str],
    email: str | None,
    data_dir: Path,
    user_agent: str,
) -> x509.Certificate:
    """Order a certificate for ``domains``, answering HTTP-01; keep it with its key.

    Raises:
        IssueError: the CA refused or the validation failed (the message says why).
    """
    import requests
    from acme import challenges, client, crypto_util, errors, messages
    from josepy.jwa import ES256
    from josepy.jwk import JWKEC

    store = store_dir(data_dir, directory_url)
    store.mkdir(parents=True, exist_ok=True, mode=0o700)
    challenge_dir = data_dir / CHALLENGES_DIR
    challenge_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    account_key = JWKEC(key=_account_key(store))
    net = client.ClientNetwork(account_key, alg=ES256, user_agent=user_agent)
    written: list[Path] = []
    try:
        acme = client.ClientV2(client.ClientV2.get_directory(directory_url, net), net)
        registration = messages.NewRegistration.from_data(email=email, terms_of_service_agreed=True)
        try:
            acme.new_account(registration)
            _say(f"registered an ACME account with {directory_url}")
        except errors.ConflictError as existing:  # this key's account: use it
            net.account = messages.RegistrationResource(
                uri=existing.location, body=messages.Registration()
            )
        key = ec.generate_private_key(ec.SECP256R1())
        order = acme.new_order(crypto_util.make_csr(_pem(key), list(domains)))
        for authorization in order.authorizations:
            if authorization.body.status == messages.STATUS_VALID:
                continue  # validated recently: the CA reuses it
            name = authorization.body.identifier.value
            offered = authorization.body.challenges
            http01 = next((c for c in offered if isinstance(c.chall, challenges.HTTP01)), None)
            if http01 is None:
                raise IssueError(f"the CA offers no HTTP-01 challenge for {name}")
            response, validation = http01.response_and_validation(account_key)
            path = challenge_dir / http01.chall.encode("token")
            path.write_text(validation)
            written.append(path)
            acme.answer_challenge(http01, response)
            _say(f"answering the CA's HTTP-01 challenge for {name}")
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_DEADLINE_S)
        try:
            finished = acme.poll_and_finalize(order, deadline)
        except errors.ValidationError as failed:
            raise IssueError(_validation_failures(failed.failed_authzrs)) from None
        except errors.TimeoutError:
            raise IssueError(
                f"the CA did not finish the order within {ORDER_DEADLINE_S} s"
            ) from None
    except messages.Error as refused:
        raise IssueError(f"the CA refused: {refused.detail or refused.typ}") from None
    except errors.Error as exc:
        raise IssueError(f"the ACME exchange with {directory_url} failed: {exc!r}") from None
    except requests.RequestException as exc:
        raise IssueError(f"cannot reach the ACME directory {directory_url}: {exc}") from None
    finally:
        for path in written:
            path.unlink(missing_ok=True)
        net.session.close()
    chain = finished.fullchain_pem.encode()
    cert = x509.load_pem_x509_certificate(chain)
    _write_private(store / "key.pem", _pem(key))
    _write_private(store / "cert.pem", chain)
    return cert


def _validation_failures(authorizations: Sequence[object]) -> str:
    from acme import messages

    reasons = []
    for authorization in authorizations:
        assert isinstance(authorization, messages.AuthorizationResource)
        name = authorization.body.identifier.value
        for challenge in authorization.body.challenges:
            if challenge.error is not None:
                reasons.append(f"{name}: {challenge.error.detail or challenge.error.typ}")
    return "validation failed: " + ("; ".join(reasons) or "the CA gave no reason")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.acme_issuer", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--directory", required=True, help="the ACME directory URL")
    parser.add_argument("--domain", action="append", required=True, help="a name to certify")
    parser.add_argument("--email", help="contact address for the CA's expiry notices")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--user-agent", default="homeport")
    arguments = parser.parse_args(argv)
    store = store_dir(arguments.data_dir, arguments.directory)
    now = datetime.datetime.now(datetime.UTC)
    cert = current_certificate(store, arguments.domain, now)
    status = "current"
    if cert is None:
        try:
            cert = issue(
                arguments.directory,
                arguments.domain,
                arguments.email,
                arguments.data_dir,
                arguments.user_agent,
            )
        except (IssueError, OSError) as exc:
            _say(str(exc))
            return 1
        status = "issued"
    result = {
        "status": status,
        "cert": str(store / "cert.pem"),
        "key": str(store / "key.pem"),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "renew_at": renew_at(cert).isoformat(),
    }
    print(json.dumps(result), flush=True)  # noqa: T201 - the report the exit server reads
    return 0


if __name__ == "__main__":
    sys.exit(main())
